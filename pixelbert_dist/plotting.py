"""Turn a run's metrics.jsonl into PNG curves: whatever the run logged (pre-training or a
fine-tuning task), one panel per kind of key, and only panels that have data.

python launch/plot.py RUN_DIR [--out FILE.png]     (or: pixelbert-plot RUN_DIR)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import matplotlib.figure

# (title, does a key belong here, y scale), first match wins. MLM starts near ln(vocab) ~ 8-10
# while ITM sits below 0.7, so the losses share a log axis or ITM's curve is a flat line.
PANELS = [
    ("losses", lambda k: k.endswith("loss"), "log"),
    ("learning rate", lambda k: k.startswith("lr_"), "log"),
    ("gradient norm", lambda k: k == "grad_norm", "log"),
    ("retrieval R@K (%)", lambda k: re.search(r"(^|_)r\d+$", k) is not None, "linear"),
    ("throughput (samples/s)", lambda k: k == "samples_per_s", "linear"),
    ("scores", lambda k: True, "linear"),  # accuracies, VQA score, consistency, rsum ...
]
# Bookkeeping, not curves: counts, the epoch, and the meter's other figures.
NOT_PLOTTED = re.compile(
    r"^(step|split|time|epoch|nonfinite_skipped|damaged_samples|loss_scale|peak_mem_gib|tflops_per_gpu|mfu"
    r"|data_wait_frac|num_\w+)$"
)
CHANCE = {"itm_acc": 0.5}  # a random guess, drawn as a grey line in the key's panel
TASK_CHANCE = {"nlvr2": {"accuracy": 50.0}}  # NLVR2 is a balanced true/false task (percent)
SPLIT_STYLES = {"train": "-"}  # any other split (val, dev, test ...): dashed points


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``RUN/metrics.jsonl`` -> ``out`` (default ``RUN/curves.png``)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    from pixelbert_dist.metrics import read_jsonl  # torch: not before the command line is parsed

    fig = curves_figure(read_jsonl(run_dir / "metrics.jsonl"), title=str(run_dir), chance=chance_levels(run_dir))
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


def chance_levels(run_dir: Path) -> dict[str, float]:
    """{key: a random guess's value} for this run: a fine-tuning run's task is ``task:`` in
    its config.yaml."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    task = config.get("task") if isinstance(config, dict) else None
    return {**CHANCE, **TASK_CHANCE.get(task, {})}


def panel_keys(rows: list[dict]) -> list[tuple[str, list[str], str]]:
    """(title, keys, scale) of every panel that has at least one key in ``rows``."""
    keys = sorted({k for row in rows for k in row if not NOT_PLOTTED.match(k)})
    panels = {title: [] for title, _, _ in PANELS}
    for key in keys:
        panels[next(title for title, belongs, _ in PANELS if belongs(key))].append(key)
    return [(title, panels[title], scale) for title, _, scale in PANELS if panels[title]]


def curves_figure(rows: list[dict], title: str = "", chance: dict | None = None) -> matplotlib.figure.Figure:
    """One panel per kind of key, train as lines and other splits as dashed points; a
    grey dotted line where a key has a chance level (``chance``: {key: value})."""
    chance = CHANCE if chance is None else chance
    panels = panel_keys(rows)
    columns = min(len(panels), 3) or 1
    lines = -(-max(len(panels), 1) // columns)
    fig, axes = _pyplot().subplots(lines, columns, figsize=(5 * columns, 4 * lines), squeeze=False)
    splits = sorted({r["split"] for r in rows}, key=lambda s: (s != "train", s))
    for ax, (panel, keys, scale) in zip(axes.flat, panels):
        for colour, key in enumerate(keys):  # every split of one quantity: one colour
            for split in splits:
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if points:
                    style = SPLIT_STYLES.get(split, "o--")
                    ax.plot(*zip(*points), style, color=f"C{colour}", label=f"{split} {key}", markersize=4)
            if key in chance:
                ax.axhline(chance[key], color="grey", linestyle=":", label=f"chance {key}")
        ax.set_title(panel)
        if scale == "log" and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()  # no empty panels
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
