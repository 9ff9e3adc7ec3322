"""Turn a run's metrics.jsonl into PNG curves: losses, accuracies, throughput.

python launch/plot.py RUN_DIR [--out FILE.png]     (or: pixelbert-plot RUN_DIR)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import matplotlib.figure


# (title, keys, y scale): MLM starts near ln(vocab) ~ 8-10 while ITM sits below 0.7, so the
# losses share a log axis or ITM's whole curve is a flat line at the bottom.
PANELS = [
    ("losses", ["loss", "mlm_loss", "itm_loss"], "log"),
    ("accuracy", ["itm_acc", "mlm_acc"], "linear"),
    ("retrieval R@1 (%)", ["i2t_r1", "t2i_r1"], "linear"),
    ("throughput", ["samples_per_s"], "linear"),
]
SPLIT_STYLES = (("train", "-"), ("val", "o--"))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``RUN/metrics.jsonl`` -> ``out`` (default ``RUN/curves.png``)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    from pixelbert_dist.metrics import read_jsonl  # torch: not before the command line is parsed

    fig = curves_figure(read_jsonl(run_dir / "metrics.jsonl"), title=str(run_dir))
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only backend, loaded when a figure is drawn: its
    import takes seconds, which --help must not wait for."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def curves_figure(rows: list[dict], title: str = "") -> matplotlib.figure.Figure:
    """One panel per PANELS entry, train as lines and val as dashed points."""
    fig, axes = _pyplot().subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (panel, keys, scale) in zip(axes, PANELS):
        for colour, key in enumerate(keys):  # train and val of one quantity: one colour
            for split, style in SPLIT_STYLES:
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", label=f"{split} {key}", markersize=4)
        ax.set_title(panel)
        if scale == "log" and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a run's metrics.jsonl as PNG curves")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/curves.png")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        parser.error(f"{args.run_dir / 'metrics.jsonl'} does not exist: pass a run folder")
    print(plot_run(args.run_dir, args.out))
    return 0
