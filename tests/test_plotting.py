"""The curves plot: losses on a log axis, train and val of one quantity in one colour."""

from __future__ import annotations

import json

import pytest

from pixelbert_dist.plotting import curves_figure, main, plot_run


def _rows() -> list[dict]:
    rows = []
    for step in range(10, 110, 10):
        rows.append(
            {
                "step": step,
                "split": "train",
                "loss": 9.0 / step**0.5,
                "mlm_loss": 8.0 / step**0.5,
                "itm_loss": 0.69,
                "itm_acc": 0.5,
                "samples_per_s": 30.0,
            }
        )
    rows.append({"step": 100, "split": "val", "mlm_loss": 1.0, "itm_loss": 0.6, "itm_acc": 0.8})
    return rows


def test_losses_share_a_log_axis_and_splits_share_colours():
    fig = curves_figure(_rows(), title="runs/x")
    assert fig._suptitle.get_text() == "runs/x"  # the run, not the last panel's title
    losses, accuracy = fig.axes[0], fig.axes[1]
    assert losses.get_yscale() == "log"
    assert accuracy.get_yscale() == "linear"
    colour = {line.get_label(): line.get_color() for line in losses.lines}
    assert colour["train mlm_loss"] == colour["val mlm_loss"]
    assert colour["train itm_loss"] == colour["val itm_loss"]
    assert colour["train mlm_loss"] != colour["train itm_loss"]


def test_plot_run_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_refuses_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
