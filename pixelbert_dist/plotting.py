"""Turn a run's metrics.jsonl into PNG curves: losses, accuracies, throughput."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pixelbert_dist.metrics import read_jsonl  # noqa: E402

PANELS = [
    ("losses", ["loss", "mlm_loss", "itm_loss"]),
    ("accuracy", ["itm_acc", "mlm_acc"]),
    ("retrieval R@1 (%)", ["i2t_r1", "t2i_r1"]),
    ("throughput", ["samples_per_s"]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (title, keys) in zip(axes, PANELS):
        for split, style in (("train", "-"), ("val", "o--")):
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if points:
                    ax.plot(*zip(*points), style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
