"""Fine-tuning parts against references: the task loader's exact resume, VQA soft targets
in the batch, NLVR2 pairs, hardest-negative selection, and retrieval scores computed with
the CNN once per image equal to scoring every pair on its own."""

import json

import pytest
import torch

from pixelbert_dist.config import load_config
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages, TaskLoader, loader_data_config, tokenize
from pixelbert_dist.finetune.evaluate import scoring_engine, split_loader
from pixelbert_dist.finetune.heads import TEXT_KEYS, RetrievalModel
from pixelbert_dist.finetune.score_store import load_score_matrix
from pixelbert_dist.finetune.task import EvaluationStopped
from pixelbert_dist.finetune.tasks import make_task
from pixelbert_dist.finetune.trainer import load_export
from pixelbert_dist.finetune.vqa_data import answer_score
from pixelbert_dist.train.recall import recall_at_k


def _task(ft, name, tmp_path, *overrides):
    t = ft["tasks"]
    files = {
        "vqa": [
            f"vqa.train_questions={t}/vqa/v2_OpenEnded_mscoco_train_questions.json",
            f"vqa.train_annotations={t}/vqa/v2_mscoco_train_annotations.json",
            f"vqa.image_map={t}/vqa/image_ids.json",
        ],
        "nlvr2": [f"nlvr2.train={t}/nlvr2/train.json", f"nlvr2.image_map={t}/nlvr2/images.json"],
        "retrieval": [
            f"retrieval.karpathy={t}/retrieval/dataset_synthetic.json",
            "retrieval.train_splits=[train]",
            "retrieval.num_negatives=6",
            "retrieval.hard_negatives=2",
            "retrieval.key_format='{stem}'",
        ],
    }[name]  # the synthetic file names KEY.jpg
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            f"task={name}",
            f"pretrained={ft['export']}",
            "data.backend=pil",
            "data.num_workers=0",
            "data.image_shorter=64",
            "data.image_max=64",
            *files,
            *overrides,
        ],
    )
    cfg.data.shards = ft["shards"]
    backbone, tokenizer = load_export(cfg)
    task = make_task(cfg, tokenizer, KeyedImages(cfg.data.shards), tmp_path)
    return cfg, task, backbone


def _loader(cfg, task, batch, **kw):
    return TaskLoader(
        task.train_examples,
        task.images,
        task.image_keys,
        task.collate,
        loader_data_config(cfg.data),
        batch,
        images_per_example=task.images_per_example,
        **kw,
    )


def _ids(batch):
    return [str(ex) for ex in batch["examples"]]


def test_task_loader_resumes_exactly(ft, tmp_path):
    cfg, task, _ = _task(ft, "retrieval", tmp_path)
    loader = _loader(cfg, task, 8, rank=1, world_size=2, seed=3)
    loader.set_epoch(2)
    full = list(loader)
    again = _loader(cfg, task, 8, rank=1, world_size=2, seed=3)
    again.set_epoch(2)
    it = iter(again)
    first = [next(it) for _ in range(2)]
    state = again.state_dict()
    fresh = _loader(cfg, task, 8, rank=1, world_size=2, seed=3)
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert [_ids(b) for b in first + rest] == [_ids(b) for b in full]
    for a, b in zip(first + rest, full):  # the same negatives are drawn after a resume
        torch.testing.assert_close(a["negatives"]["input_ids"], b["negatives"]["input_ids"])
        torch.testing.assert_close(a["images"], b["images"])
    other = _loader(cfg, task, 4, rank=1, world_size=2, seed=3)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_vqa_batch_targets_and_nlvr2_pairs(ft, tmp_path):
    cfg, task, _ = _task(ft, "vqa", tmp_path)
    batch = next(iter(_loader(cfg, task, 4, shuffle=False)))
    for row, (ex, _) in enumerate(batch["examples"]):
        counts = {}
        for a in ex.answers:
            counts[task.vocab.index(a)] = counts.get(task.vocab.index(a), 0) + 1
        want = torch.zeros(len(task.vocab))
        for idx, c in counts.items():
            if idx is not None:
                want[idx] = answer_score(c, len(ex.answers))
        torch.testing.assert_close(batch["targets"][row], want)
    cfg, task, backbone = _task(ft, "nlvr2", tmp_path)
    batch = next(iter(_loader(cfg, task, 3, shuffle=False)))
    assert batch["images"].shape[0] == 6
    assert batch["labels"].tolist() == [int(ex.label) for ex in batch["examples"]]
    model = task.build_model(backbone).eval()
    with torch.no_grad():
        logits = model(batch)["logits"]
        # reference: each image with the sentence on its own, then the head on [left; right]
        pooled = [
            model.pooled(
                {k: batch[k][i // 2 : i // 2 + 1] for k in TEXT_KEYS},
                *model.backbone.encode_pixels(batch["images"][i : i + 1], batch["image_sizes"][i : i + 1]),
            )
            for i in range(6)
        ]
        want = model.head(torch.cat([torch.cat(pooled[2 * j : 2 * j + 2], 1) for j in range(3)]))
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)


def test_retrieval_hard_negatives_and_scores(ft, tmp_path):
    cfg, task, backbone = _task(ft, "retrieval", tmp_path)
    batch = next(iter(_loader(cfg, task, 3, seed=1)))
    owner = task.train_owner
    for item in batch["examples"]:  # negatives are captions of other images
        assert item.image == owner[item.text]
    model: RetrievalModel = task.build_model(backbone).eval()
    neg = batch["negatives"]
    with torch.no_grad():
        px, mask = model.pixels(batch)
        n = neg["input_ids"].shape[0] // 3
        ref = model.match_logits(neg, px.repeat_interleave(n, 0), mask.repeat_interleave(n, 0))
        ref = (ref[:, 1] - ref[:, 0]).view(3, n)
        out = model(batch)
    hardest = ref.topk(2, dim=1).values
    # the loss's ranking rows hold the positive then the 2 hardest negatives' scores
    assert torch.isfinite(out["loss"])
    with torch.no_grad():
        pos = model.match_logits({k: batch[k] for k in TEXT_KEYS}, px, mask)
    ranking = torch.cat([(pos[:, 1] - pos[:, 0])[:, None], hardest], 1)
    want = torch.nn.functional.cross_entropy(ranking, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(out["rank_loss"], want, atol=1e-5, rtol=1e-4)


def test_retrieval_scores_equal_per_pair_scoring(dist_env, ft, tmp_path):
    cfg, task, backbone = _task(ft, "retrieval", tmp_path, "retrieval.text_batch=7", "retrieval.max_eval_images=5")
    model = task.build_model(backbone)
    engine = scoring_engine(model)
    split = cfg.retrieval.eval_split
    loader = split_loader(task, task.images, split, loader_data_config(cfg.data), 2)
    metrics = task.evaluate(engine, split, loader, lambda b: b)
    scores = load_score_matrix(task.score_folder(split), 5, task.eval_owner[split].numel())
    assert metrics == {**recall_at_k(scores, task.eval_owner[split]), "num_images": 5, "num_texts": scores.shape[1]}
    assert metrics["num_images"] == 5
    model.eval()
    one = split_loader(task, task.images, split, loader_data_config(cfg.data), 1)
    with torch.no_grad():
        for i, batch in enumerate(one):
            for t in range(0, scores.shape[1], 9):  # a few pairs, each scored alone
                text = {k: task.eval_texts[split][k][t : t + 1] for k in TEXT_KEYS}
                pooled = model.pooled(text, *model.backbone.encode_pixels(batch["images"], batch["image_sizes"]))
                logits = model.backbone.itm_head(pooled).float()[0]
                # the raw ITM margin is what retrieval ranks (not log P(match))
                torch.testing.assert_close(scores[i, t], logits[1] - logits[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- complete prediction files
def _with_missing_images(ft, tmp_path, task):
    """The task's held-out file plus examples whose images are in no shard."""
    t = ft["tasks"]
    if task == "vqa":
        data = json.loads((t / "vqa" / "v2_OpenEnded_mscoco_test_questions.json").read_text())
        for k in (1, 2):
            data["questions"].append({"image_id": 990000 + k, "question": "what color is it?", "question_id": 9900 + k})
        path = tmp_path / "test_questions.json"
        path.write_text(json.dumps(data))
        return path, {q["question_id"] for q in data["questions"]}
    lines = (t / "nlvr2" / "test1.json").read_text().splitlines()
    lines.append(json.dumps({"identifier": "test1-99999-0-0", "sentence": "two dogs", "label": "True"}))
    path = tmp_path / "test1.json"
    path.write_text("\n".join(lines) + "\n")
    return path, {json.loads(line)["identifier"] for line in lines}


def _predict(cfg, task, backbone, split, stop=None):
    engine = scoring_engine(task.build_model(backbone))
    loader = split_loader(task, task.images, split, loader_data_config(cfg.data), 8)
    task.evaluate(engine, split, loader, lambda b: b, stop=stop)
    return engine.module.eval()


def test_a_stop_ends_a_vqa_evaluation_after_the_batch_writing_nothing(dist_env, ft, tmp_path):
    cfg, task, backbone = _task(
        ft, "vqa", tmp_path, f"vqa.val_questions={ft['tasks']}/vqa/v2_OpenEnded_mscoco_val_questions.json"
    )
    batches = []

    def stop_after_first_batch():
        batches.append(None)
        return True

    with pytest.raises(EvaluationStopped, match="vqa val: nothing kept"):
        _predict(cfg, task, backbone, "val", stop=stop_after_first_batch)
    assert len(batches) == 1 and not list(tmp_path.glob("vqa_*results.json"))


@pytest.mark.parametrize("name, option", [("vqa", "vqa.test_questions"), ("nlvr2", "nlvr2.test")])
def test_a_test_split_with_missing_images_stops_naming_them(ft, tmp_path, name, option):
    path, _ = _with_missing_images(ft, tmp_path, name)
    wanted = r"\[990001, 990002\]" if name == "vqa" else r"\['test1-99999-0-img0', 'test1-99999-0-img1'\]"
    with pytest.raises(
        ValueError, match=rf"{path}: 2 image\(s\) of the test split .*{wanted}.*missing_images=text_only"
    ):
        _task(ft, name, tmp_path, f"{option}={path}")


def test_vqa_text_only_answers_every_question_of_the_file(dist_env, ft, tmp_path):
    path, question_ids = _with_missing_images(ft, tmp_path, "vqa")
    cfg, task, backbone = _task(ft, "vqa", tmp_path, f"vqa.test_questions={path}", "vqa.missing_images=text_only")
    assert task.skipped["test_images"]["text_only"] == 2
    model = _predict(cfg, task, backbone, "test")
    submitted = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "vqa_test_results.json").read_text())}
    assert set(submitted) == question_ids  # the whole questions file, as the server requires
    # a question without its image is answered from the question alone
    questions = [ex for ex, _ in task.eval_splits["test"] if ex.question_id > 9900]
    with torch.no_grad():
        text = tokenize(task.tokenizer, [ex.question for ex in questions], task.max_len)
        alone = model.head(model.backbone.pooler(model.backbone.encode_joint(text))).argmax(-1).tolist()
    assert [submitted[ex.question_id] for ex in questions] == [task.vocab.answers[i] for i in alone]


def test_nlvr2_text_only_predicts_every_line_of_the_file(dist_env, ft, tmp_path):
    path, identifiers = _with_missing_images(ft, tmp_path, "nlvr2")
    cfg, task, backbone = _task(ft, "nlvr2", tmp_path, f"nlvr2.test={path}", "nlvr2.missing_images=text_only")
    assert task.skipped["test_images"]["text_only"] == 1
    _predict(cfg, task, backbone, "test")
    lines = (tmp_path / "nlvr2_test_predictions.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in lines} == identifiers


def _evaluate_retrieval(cfg, task, backbone, stop=None) -> dict:
    engine = scoring_engine(task.build_model(backbone))
    split = cfg.retrieval.eval_split
    loader = split_loader(task, task.images, split, loader_data_config(cfg.data), 4)
    return task.evaluate(engine, split, loader, lambda b: b, model_tag="test", stop=stop)


# 128x128 images: 2x2 feature pixels, so a first stage of 1 pixel per image differs from the full model
_RERANK = ("data.image_shorter=128", "data.image_max=128", "retrieval.rerank_pixels=1")


@pytest.mark.slow
def test_rerank_with_every_candidate_equals_full_scoring(dist_env, ft, tmp_path):
    full = _evaluate_retrieval(*_task(ft, "retrieval", tmp_path / "full", "retrieval.max_eval_images=6", *_RERANK))
    cfg, task, backbone = _task(
        ft, "retrieval", tmp_path / "k", "retrieval.max_eval_images=6", "retrieval.rerank_k=1000", *_RERANK
    )
    two_stage = _evaluate_retrieval(cfg, task, backbone)
    assert {k: two_stage[k] for k in full} == full  # recalls equal exactly, ties included
    pairs = 6 * task.eval_owner[cfg.retrieval.eval_split].numel()
    assert two_stage["full_model_pairs"] == two_stage["first_stage_pairs"] == pairs


@pytest.mark.slow
def test_rerank_scores_k_candidates_per_query_in_full(dist_env, ft, tmp_path):
    """k=10 of 12 images (of the train split: the test split has fewer) and their captions:
    the full model scores exactly the pairs the first stage picks ((images + captions) x k,
    a pair both directions pick once), and the recalls are each direction's among its
    candidates."""
    cfg, task, backbone = _task(
        ft, "retrieval", tmp_path, "retrieval.eval_split=train", "retrieval.max_eval_images=12",
        "retrieval.rerank_k=10", *_RERANK,
    )  # fmt: skip
    got = _evaluate_retrieval(cfg, task, backbone)
    split = cfg.retrieval.eval_split
    owner = task.eval_owner[split]
    num_images, num_texts = len(task.eval_splits[split]), owner.numel()
    assert num_images == 12
    assert got["rerank_pairs"] == (num_images + num_texts) * 10
    cheap = load_score_matrix(task.score_folder(split, "first1px"), num_images, num_texts)
    full = load_score_matrix(task.score_folder(split, "rerank10_1px"), num_images, num_texts)
    by_text = torch.zeros_like(cheap, dtype=torch.bool)
    by_image = torch.zeros_like(cheap, dtype=torch.bool)
    for i in range(num_images):  # the first stage's picks by a plain sort, ties by index
        by_text[i, sorted(range(num_texts), key=lambda t: (-cheap[i, t].item(), t))[:10]] = True
    for t in range(num_texts):
        by_image[sorted(range(num_images), key=lambda i: (-cheap[i, t].item(), i))[:10], t] = True
    assert torch.equal(torch.isfinite(full), by_text | by_image)  # scored in full: those pairs only
    assert got["full_model_pairs"] == int((by_text | by_image).sum()) < got["rerank_pairs"]
    tr = recall_at_k(full.masked_fill(~by_text, float("-inf")), owner)
    ir = recall_at_k(full.masked_fill(~by_image, float("-inf")), owner)
    for key in tr:
        if key.startswith(("i2t", "t2i")):
            assert got[key] == (tr if key.startswith("i2t") else ir)[key], key


@pytest.mark.slow
def test_two_stage_stopped_while_re_ranking_resumes_to_the_same_recalls(dist_env, ft, tmp_path):
    """Stopped once the re-ranking's first batch is on disk: the rerun keeps the whole first
    stage and that batch, and gives the recalls of a run never stopped."""
    more = ("retrieval.eval_split=train", "retrieval.max_eval_images=12", "retrieval.rerank_k=10", *_RERANK)
    whole = _evaluate_retrieval(*_task(ft, "retrieval", tmp_path / "whole", *more))
    cfg, task, backbone = _task(ft, "retrieval", tmp_path / "cut", *more)
    split = cfg.retrieval.eval_split
    first = task.score_folder(split, "first1px") / "rank00000"
    second = task.score_folder(split, "rerank10_1px") / "rank00000"
    with pytest.raises(EvaluationStopped, match="re-ranking: 1 of 3 batches of score rows kept"):
        _evaluate_retrieval(cfg, task, backbone, stop=lambda: (second / "batch000000.safetensors").exists())
    kept = {p: p.stat().st_mtime_ns for p in [*first.glob("batch*"), *second.glob("batch*")]}
    assert len(kept) == 3 + 1
    assert _evaluate_retrieval(cfg, task, backbone) == whole
    assert kept == {p: p.stat().st_mtime_ns for p in kept}  # nothing kept was scored again
