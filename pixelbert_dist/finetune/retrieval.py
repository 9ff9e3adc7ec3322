"""Image-text retrieval (COCO / Flickr30K through the Karpathy split file).

Training: each example is one (image, caption) pair; its batch also carries
``num_negatives`` random captions of other training images per pair, drawn from the
loader's seeded generator (so a resume redraws the same ones), and the model keeps the
hardest for backprop (``heads.RetrievalModel``).

Evaluation scores every (image, caption) pair of the split with the ITM margin: each
image's pixel tokens are computed once (the CNN runs once per image), and the
transformer runs over ``text_batch`` captions at a time against them. Ranks split the
images; each keeps its rows on disk (``score_store``: resumable, never the whole matrix
on one rank), then R@1/5/10 both ways, their means and rsum (``train.recall``: ranked as
the references rank, ties by index). The val split
(``retrieval.val_split``) is what training evaluates on the way; the test split
(``retrieval.eval_split``) is evaluated once, at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from pixelbert_dist.collectives import all_reduce_sums
from pixelbert_dist.console import Progress
from pixelbert_dist.finetune.data import tokenize
from pixelbert_dist.finetune.heads import TEXT_KEYS, RetrievalModel
from pixelbert_dist.finetune.rerank import candidates_only, i2t_candidates, t2i_candidates, thinned_pixels
from pixelbert_dist.finetune.retrieval_metrics import (
    KarpathyFormatError,
    flatten_captions,
    read_karpathy_split,
    sample_negatives,
)
from pixelbert_dist.finetune.score_store import ScoreStore, sharded_recall
from pixelbert_dist.finetune.task import MAKE_DEMO_TASKS, EvaluationStopped, Task, stop_agreed
from pixelbert_dist.train.evaluate import gathered_params


def weights_checksum(module: torch.nn.Module) -> str:
    """A float64 sum of every parameter and buffer: which weights scored the rows."""
    tensors = [t.detach().double().sum() for t in (*module.parameters(), *module.buffers()) if t.numel()]
    return repr(torch.stack(tensors).sum().item()) if tensors else "empty"


class Item(NamedTuple):
    key: str  # shard key of the image
    image: int  # index of the image in its split
    text: int | None  # caption index (training pairs); None for an evaluation image


class RetrievalTask(Task):
    name, main_metric = "retrieval", "rsum"

    def __init__(self, cfg, tokenizer, images, run_dir):
        super().__init__(cfg, tokenizer, images, run_dir)
        r = cfg.retrieval
        if not r.karpathy:
            raise ValueError("retrieval needs retrieval.karpathy (--karpathy dataset_coco.json)")
        if not Path(r.karpathy).is_file():
            raise FileNotFoundError(
                f"Karpathy split file {r.karpathy} does not exist (official: dataset_coco.json "
                "or dataset_flickr30k.json in Karpathy's caption_datasets.zip; the demo's is "
                f"made from its shards by: {MAKE_DEMO_TASKS})"
            )
        train = self._read("train", r.train_splits)
        self.train_keys = [self.key_of(im) for im in train]
        self.train_texts, self.train_owner = flatten_captions(train)
        if len(train) < 2:
            raise ValueError(f"{r.karpathy}: {len(train)} training image(s) with shards: need at least 2")
        self.train_examples = [Item(self.train_keys[i], i, t) for t, i in enumerate(self.train_owner)]
        self.eval_texts, self.eval_owner = {}, {}
        if r.val_split and r.val_split != r.eval_split:
            try:
                self._add_eval_split(r.val_split)
            except KarpathyFormatError as err:  # a file without that split: say so in the results
                self.skipped[f"{r.val_split}_split"] = str(err)
        self._add_eval_split(r.eval_split)

    def _add_eval_split(self, split: str) -> None:
        images = self._read(split, [split])
        if self.cfg.retrieval.max_eval_images:
            images = images[: self.cfg.retrieval.max_eval_images]
        texts, owner = flatten_captions(images)
        self.eval_texts[split] = tokenize(self.tokenizer, texts, self.max_len)
        self.eval_owner[split] = torch.tensor(owner)
        self.eval_splits[split] = [Item(self.key_of(im), i, None) for i, im in enumerate(images)]

    def validation_splits(self) -> list[str]:
        return [s for s in self.eval_splits if s != self.cfg.retrieval.eval_split]

    def key_of(self, image) -> str:
        return self.cfg.retrieval.key_format.format(
            stem=Path(image.filename).stem, image_id=image.image_id, filename=image.filename, dataset=image.dataset
        )

    def _read(self, split: str, splits: list[str]) -> list:
        images = read_karpathy_split(self.cfg.retrieval.karpathy, splits)
        kept = [im for im in images if self.key_of(im) in self.images]
        if not kept:
            rule = f"retrieval.key_format={self.cfg.retrieval.key_format!r} for {images[0].filename}"
            raise self.images.no_match(
                f"{self.cfg.retrieval.karpathy} split(s) {list(splits)}", self.key_of(images[0]), rule
            )
        missing = [im.filename for im in images if self.key_of(im) not in self.images]
        self.skipped[f"{split}_images"] = {
            "images_missing": len(missing),
            "example_missing_images": missing[:5],
            "captions_missing_image": sum(len(im.captions) for im in images if self.key_of(im) not in self.images),
        }
        return kept

    def build_model(self, backbone):
        r = self.cfg.retrieval
        return RetrievalModel(backbone, r.hard_negatives, r.rank_weight, r.itm_weight, self.cfg.train.freeze_cnn)

    def image_keys(self, item: Item) -> list[str]:
        return [item.key]

    def collate(self, items, generator) -> dict:
        if items[0].text is None:
            return {}
        n = self.cfg.retrieval.num_negatives
        negatives = sample_negatives(self.train_owner, [it.image for it in items], n, generator)
        texts = [self.train_texts[it.text] for it in items] + [self.train_texts[j] for j in negatives.flatten()]
        # one tokenisation: positives and negatives share a length, so the model can concatenate them
        enc = tokenize(self.tokenizer, texts, self.max_len)
        b = len(items)
        return {**{k: v[:b] for k, v in enc.items()}, "negatives": {k: v[b:] for k, v in enc.items()}}

    def score_folder(self, split: str, stage: str = "") -> Path:
        """Where an evaluation of ``split`` keeps its score rows (``score_store``); the two
        stages of ``retrieval.rerank_k`` each keep theirs beside."""
        return self.run_dir / "scores" / f"retrieval_{split}{'_' + stage if stage else ''}"

    @torch.no_grad()
    def evaluate(self, engine, split: str, loader, to_device, model_tag: str = "", stop=None) -> dict:
        """Score every (image, caption) pair of ``split`` (or, with ``retrieval.rerank_k``,
        the first stage's candidates): this rank's images, a loader batch at a time, each
        batch's rows written to the score store as it finishes (a rerun of the same
        evaluation, ``model_tag`` included, resumes after the last whole batch); then
        recall@K from the rows where they lie. ``stop()`` true (SIGTERM) ends it within one
        transformer call: ``EvaluationStopped``, the finished batches kept."""
        owner = self.eval_owner[split]
        num_images, num_texts = len(self.eval_splits[split]), owner.numel()
        engine.eval()
        try:
            with gathered_params(engine):
                meta = {"split": split, "num_images": num_images, "num_texts": num_texts, "model": model_tag}
                meta["weights"] = weights_checksum(engine.module)  # a rerun with other weights starts afresh
                meta.update({k: v for k, v in loader.state_dict().items() if k != "batches_done"})
                texts = to_device(self.eval_texts[split])
                scoring = _Scoring(self, engine.module, split, loader, texts, to_device, stop)
                if self.cfg.retrieval.rerank_k:
                    metrics = self._two_stage(scoring, meta)
                else:
                    images, rows = scoring.run("", ScoreStore(self.score_folder(split), loader.rank, meta))
                    metrics = sharded_recall(images, rows, owner, num_images)
        finally:
            engine.train()
        return {**metrics, "num_images": num_images, "num_texts": num_texts}

    def _two_stage(self, scoring: "_Scoring", meta: dict) -> dict:
        """``rerank``: the thinned-image first stage over every pair, each direction's
        ``rerank_k`` best candidates, the full model over those only."""
        r, split, rank = self.cfg.retrieval, scoring.split, scoring.loader.rank
        owner = self.eval_owner[split]
        num_images, num_texts = len(self.eval_splits[split]), owner.numel()
        first = {**meta, "stage": "first", "pixels": r.rerank_pixels}
        folder = self.score_folder(split, f"first{r.rerank_pixels}px")
        images, cheap = scoring.run("first stage", ScoreStore(folder, rank, first), thin=r.rerank_pixels)
        by_text = i2t_candidates(cheap, r.rerank_k)  # TR: each image's k best captions
        by_image = t2i_candidates(cheap, images, r.rerank_k, num_images)  # IR: each caption's k best images
        wanted = by_text | by_image
        second = {**first, "stage": "rerank", "k": r.rerank_k}
        folder = self.score_folder(split, f"rerank{r.rerank_k}_{r.rerank_pixels}px")
        picked = {image: wanted[row] for row, image in enumerate(images.tolist())}
        scored, full = scoring.run("re-ranking", ScoreStore(folder, rank, second), wanted=picked)
        full = full[torch.argsort(scored)][torch.argsort(torch.argsort(images))]  # the first stage's row order
        metrics = sharded_recall(
            images, candidates_only(full, by_text), owner, num_images, t2i_rows=candidates_only(full, by_image)
        )
        counts = all_reduce_sums({"rerank_pairs": by_text.sum() + by_image.sum(), "full_model_pairs": wanted.sum()})
        return {
            **metrics,
            "rerank_k": r.rerank_k,
            "rerank_pixels": r.rerank_pixels,
            "first_stage_pairs": num_images * num_texts,
            **{k: int(v) for k, v in counts.items()},
        }


class _Scoring:
    """One evaluation's scoring passes over this rank's images (``RetrievalTask.evaluate``)."""

    def __init__(self, task: RetrievalTask, model, split: str, loader, texts: dict, to_device, stop):
        self.task, self.model, self.split, self.loader = task, model, split, loader
        self.texts, self.to_device, self.stop = texts, to_device, stop
        self.num_texts = texts["input_ids"].shape[0]

    def stopping(self) -> bool:
        return self.stop is not None and bool(self.stop())

    def run(self, stage: str, store: ScoreStore, thin: int = 0, wanted: dict | None = None):
        """Every batch of the loader not yet in ``store`` scored and written there; then
        this rank's (images, rows) from the store. ``thin``: feature pixels per image (the
        first stage), 0 all; ``wanted``: image -> bool [num_texts], the captions to score
        (-inf for the rest), None every one."""
        loader, done = self.loader, store.batches_done()
        if wanted is None:
            total, initial = len(loader) * loader.batch_size * self.num_texts, done * loader.batch_size * self.num_texts
        else:
            total = sum(int(w.sum()) for w in wanted.values())
            initial = int(torch.isfinite(store.rows(self.num_texts)[1]).sum())
        name = f"scoring {self.split}" + (f" ({stage})" if stage else "")
        bar = Progress(name, total, initial, self.task.is_main(), unit="pair")
        stopped = False
        if done < len(loader):
            loader.load_state_dict({**loader.state_dict(), "batches_done": done})
            for k, batch in enumerate(loader, done):
                scored = self._score_batch(batch, thin, wanted)
                if scored is None:  # stopped in this batch: it is scored again on resume
                    stopped = True
                    break
                store.write(k, *scored[:2])
                initial += scored[2]
                bar.update(scored[2])
                bar.report(initial, {})
                if self.stopping():
                    stopped = True
                    break
        bar.close()
        if stop_agreed(self.stop, stopped):
            raise EvaluationStopped(
                f"retrieval {self.split}{' ' + stage if stage else ''}: {store.batches_done()} of {len(loader)} "
                f"batches of score rows kept in {store.folder.parent}; the same command resumes after them"
            )
        return store.rows(self.num_texts)

    def _score_batch(self, batch: dict, thin: int, wanted: dict | None):
        """ITM margins of the batch's images (repeats left out) with their captions, as
        (images, rows, pairs scored): the CNN once per image, the transformer over
        ``text_batch`` captions at a time. None as soon as a stop is requested."""
        model, texts = self.model, self.texts
        pixels, mask = model.pixels(self.to_device(batch))
        if thin:
            pixels, mask = thinned_pixels(pixels, mask, thin)
        keep = [row for row, pad in enumerate(batch["is_pad"].tolist()) if not pad]
        images = torch.tensor([batch["examples"][row].image for row in keep], dtype=torch.long)
        step = self.task.cfg.retrieval.text_batch
        rows, pairs = torch.full((len(keep), self.num_texts), float("-inf")), 0
        for out_row, (row, image) in enumerate(zip(keep, images.tolist())):
            chosen = torch.arange(self.num_texts) if wanted is None else wanted[image].nonzero().flatten()
            for lo in range(0, chosen.numel(), step):
                if self.stopping():
                    return None
                index = chosen[lo : lo + step]
                chunk = {k: texts[k][index.to(texts[k].device)] for k in TEXT_KEYS}
                n = index.numel()
                margin = model.backbone.itm_score(
                    chunk, pixels[row : row + 1].expand(n, -1, -1), mask[row : row + 1].expand(n, -1)
                )
                rows[out_row, index] = margin.float().cpu()
            pairs += chosen.numel()
        return images, rows, pairs
