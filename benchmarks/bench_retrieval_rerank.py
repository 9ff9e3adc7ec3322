"""Two-stage retrieval (``retrieval.rerank_k``): the recall it loses against scoring every
pair in full, the pairs each stage scores, and what that saves.

On the synthetic retrieval set (``finetune/synthetic_tasks``), the real evaluation
(``RetrievalTask.evaluate``) scores every pair in full (rerank_k=0), then runs two-stage
at the smallest k. Other k reuse both score stores: the first stage's picks
(``finetune/rerank``) applied to the full matrix give what a run at that k gives, since
the full model's score of a pair does not depend on the other pairs scored (the run at
the smallest k is compared with this to check it). The first stage's and the full model's
pairs/s are measured side by side on the same images and captions, and the FLOP model
projects the saving at the paper's image size.

    python -m benchmarks.bench_retrieval_rerank [--pretrained EXPORT] [--shards DIR ...]
        [--karpathy FILE] [--images 32] [--ks 10 16 24] [--pixels 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results
from pixelbert_dist.train.run import close_started_group

# torch, the model and the finetune modules are imported in the functions that use them:
# --help answers without them

RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def synthetic_inputs(root: Path, pretrained: str | None) -> tuple[list[str], Path, str]:
    """Shards, the Karpathy file and an export: the demo's shapes set (``data/synthetic``
    when present, else made under ``root``) and, without --pretrained, a seeded untrained
    tiny model."""
    import torch

    from pixelbert_dist.data.builders import build_synthetic
    from pixelbert_dist.data.text import load_tokenizer
    from pixelbert_dist.finetune.synthetic_tasks import SyntheticTasksConfig, generate_tasks
    from pixelbert_dist.model import build_model

    shards = Path("data/synthetic")
    if not (shards / "val" / "manifest.json").is_file():
        shards = root / "shards"
        build_synthetic(shards, 600, seed=0)
    generate_tasks([shards / "train", shards / "val"], root / "tasks", SyntheticTasksConfig(seed=1))
    if pretrained is None:
        torch.manual_seed(0)
        pretrained = str(build_model("tiny").save_pretrained(root / "export", load_tokenizer()))
    return [str(shards / "train"), str(shards / "val")], root / "tasks/retrieval/dataset_synthetic.json", pretrained


def make_evaluation(args, shards, karpathy, pretrained, run_dir: Path, k: int):
    """(task, engine, loader) of the test split, ``retrieval.rerank_k=k``."""
    from pixelbert_dist.config import load_config
    from pixelbert_dist.finetune.config import FinetuneConfig
    from pixelbert_dist.finetune.data import KeyedImages, loader_data_config
    from pixelbert_dist.finetune.evaluate import scoring_engine, split_loader
    from pixelbert_dist.finetune.tasks import make_task
    from pixelbert_dist.finetune.trainer import load_export

    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "task=retrieval",
            f"pretrained={pretrained}",
            f"retrieval.karpathy={karpathy}",
            "retrieval.train_splits=[test]",  # evaluation only: read no other split
            "retrieval.val_split=''",
            "retrieval.key_format='{stem}'",
            f"retrieval.max_eval_images={args.images}",
            f"retrieval.rerank_k={k}",
            f"retrieval.rerank_pixels={args.pixels}",
            "data.backend=pil",
            "data.num_workers=0",
            f"data.image_shorter={args.image}",
            f"data.image_max={2 * args.image}",
        ],
    )
    cfg.data.shards = shards
    cfg.validate()
    backbone, tokenizer = load_export(cfg)
    task = make_task(cfg, tokenizer, KeyedImages(shards), run_dir)
    engine = scoring_engine(task.build_model(backbone))
    loader = split_loader(task, task.images, cfg.retrieval.eval_split, loader_data_config(cfg.data), 8)
    return task, engine, loader


def pair_rates(task, engine, loader, pixels: int, repeats: int) -> dict[str, float]:
    """Pairs/s of the full model and of the first stage, alternated on one batch of images
    against every caption (medians of ``repeats``)."""
    import torch

    from pixelbert_dist.finetune.heads import TEXT_KEYS
    from pixelbert_dist.finetune.rerank import thinned_pixels

    model, texts = engine.module, task.eval_texts[task.cfg.retrieval.eval_split]
    batch = next(iter(loader))
    seconds = {"full": [], "first": []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for stage in seconds:
                start = time.perf_counter()
                tokens, mask = model.pixels(batch)
                if stage == "first":
                    tokens, mask = thinned_pixels(tokens, mask, pixels)
                for row in range(tokens.shape[0]):
                    for lo in range(0, texts["input_ids"].shape[0], 64):
                        chunk = {key: texts[key][lo : lo + 64] for key in TEXT_KEYS}
                        n = chunk["input_ids"].shape[0]
                        model.backbone.itm_score(
                            chunk, tokens[row : row + 1].expand(n, -1, -1), mask[row : row + 1].expand(n, -1)
                        )
                seconds[stage].append(time.perf_counter() - start)
    pairs = batch["images"].shape[0] * texts["input_ids"].shape[0]
    return {stage: pairs / statistics.median(s[1:]) for stage, s in seconds.items()}


def rerank_row(k: int, cheap, full, owner, rates: dict) -> dict:
    """Two-stage at ``k`` from the first stage's and the full model's score matrices."""
    import torch

    from pixelbert_dist.finetune.rerank import candidates_only, i2t_candidates, t2i_candidates
    from pixelbert_dist.finetune.score_store import sharded_recall

    num_images, num_texts = full.shape
    images = torch.arange(num_images)
    by_text, by_image = i2t_candidates(cheap, k), t2i_candidates(cheap, images, k, num_images)
    metrics = sharded_recall(
        images, candidates_only(full, by_text), owner, num_images, t2i_rows=candidates_only(full, by_image)
    )
    full_pairs = int((by_text | by_image).sum())
    # how closely the first stage tracks the full model: the share of each query's 10 best
    # by full score among its candidates (all 10 kept: R@1/5/10 as full scoring gives them)
    tr_kept = (i2t_candidates(full, 10) & by_text).sum() / (num_images * min(10, num_texts))
    ir_kept = (t2i_candidates(full, images, 10, num_images) & by_image).sum() / (num_texts * min(10, num_images))
    seconds = num_images * num_texts / rates["first"] + full_pairs / rates["full"]
    return {
        "rerank_k": k,
        **{key: round(metrics[key], 2) for key in RECALLS},
        "first_stage_pairs": num_images * num_texts,
        "rerank_pairs": int(by_text.sum() + by_image.sum()),
        "full_model_pairs": full_pairs,
        "tr_top10_kept_pct": round(100 * float(tr_kept), 1),
        "ir_top10_kept_pct": round(100 * float(ir_kept), 1),
        "cost_vs_full": round(seconds / (num_images * num_texts / rates["full"]), 3),
    }


def paper_projection(pixels: int, ks: list[int], text_len: int = 40) -> list[dict]:
    """FLOPs of two-stage over full scoring for R50 at 800x1333 on COCO 5K (5,000 x 25,010),
    counting (images + captions) x k full-model pairs (an upper bound: shared pairs run once)."""
    from pixelbert_dist.model import preset_config
    from pixelbert_dist.model.flops import pair_forward_flops

    cfg, hw, (images, texts) = preset_config("pixelbert-r50"), (800, 1333), (5000, 25010)
    full, first = pair_forward_flops(cfg, hw, text_len), pair_forward_flops(cfg, hw, text_len, pixels)
    rows = []
    for k in ks:
        two_stage = images * texts * first + (images + texts) * k * full
        rows.append({"rerank_k": k, "first_pair_vs_full": round(first / full, 3), "cost_vs_full": round(
            two_stage / (images * texts * full), 3)})  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="an export (default: an untrained tiny model, seeded)")
    parser.add_argument("--images", type=int, default=32, help="test images scored (their captions with them)")
    parser.add_argument("--image", type=int, default=256, help="shorter image side (tiny: 64 px per feature pixel)")
    parser.add_argument("--pixels", type=int, default=4, help="retrieval.rerank_pixels")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 16, 24])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="results folder (default: a new one under benchmarks/results)")
    args = parser.parse_args(argv)
    from pixelbert_dist.distributed.env import init_distributed
    from pixelbert_dist.finetune.score_store import load_score_matrix

    init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_rerank_"))
    shards, karpathy, pretrained = synthetic_inputs(work, args.pretrained)
    full_task, engine, loader = make_evaluation(args, shards, karpathy, pretrained, work / "full", 0)
    split = full_task.cfg.retrieval.eval_split
    full_metrics = full_task.evaluate(engine, split, loader, lambda b: b, model_tag="bench")
    rates = pair_rates(full_task, engine, loader, args.pixels, args.repeats)
    task, engine, loader = make_evaluation(args, shards, karpathy, pretrained, work / "two", min(args.ks))
    real = task.evaluate(engine, split, loader, lambda b: b, model_tag="bench")
    owner, num_images = task.eval_owner[split], len(task.eval_splits[split])
    full = load_score_matrix(full_task.score_folder(split), num_images, owner.numel())
    cheap = load_score_matrix(task.score_folder(split, f"first{args.pixels}px"), num_images, owner.numel())
    rows = [{"rerank_k": 0, **{key: round(full_metrics[key], 2) for key in RECALLS}, "cost_vs_full": 1.0}]
    rows += [rerank_row(k, cheap, full, owner, rates) for k in sorted(args.ks)]
    checked = all(round(real[key], 2) == rows[1][key] for key in RECALLS)
    print(f"run at k={min(args.ks)} equals the figures from the stores: {checked}", flush=True)
    config = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "pretrained": args.pretrained or "untrained tiny (seed 0)",
        "images": num_images,
        "texts": owner.numel(),
        "pairs_per_s_full": round(rates["full"], 1),
        "pairs_per_s_first_stage": round(rates["first"], 1),
        "smallest_k_run_equals_stores": checked,
        "baseline": "rerank_k=0: every pair scored in full",
    }
    columns = ["rerank_k", *RECALLS, "first_stage_pairs", "rerank_pairs", "full_model_pairs"]
    columns += ["tr_top10_kept_pct", "ir_top10_kept_pct", "cost_vs_full"]
    write_results("retrieval_rerank", rows, config, args.out, columns)
    columns = ["rerank_k", "first_pair_vs_full", "cost_vs_full"]
    projection = paper_projection(16, [64, 128, 256])
    write_results(
        "retrieval_rerank_projection", projection, {"preset": "pixelbert-r50", "pixels": 16}, args.out, columns
    )
    return 0


if __name__ == "__main__":
    code = main()
    close_started_group()
    sys.exit(code)
