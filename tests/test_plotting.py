"""The curves plot: a panel per kind of key the run logged (none empty), losses, lr and
gradient norm on log axes, every split of one quantity in one colour, chance lines."""

from __future__ import annotations

import json

import pytest

from pixelbert_dist.plotting import chance_levels, curves_figure, main, plot_run


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
                "lr_cnn": 1e-2 * step / 100,
                "lr_transformer_decay": 1e-4 * step / 100,
                "grad_norm": 3.0 / step,
                "epoch": 0,
                "peak_mem_gib": 1.5,
            }
        )
    rows.append({"step": 100, "split": "val", "mlm_loss": 1.0, "itm_loss": 0.6, "itm_acc": 0.8})
    return rows


def test_losses_share_a_log_axis_and_splits_share_colours():
    fig = curves_figure(_rows(), title="runs/x")
    assert fig._suptitle.get_text() == "runs/x"  # the run, not the last panel's title
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["losses", "learning rate", "gradient norm", "throughput (samples/s)", "scores"]
    losses, accuracy = panels["losses"], panels["scores"]
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


def _titles_and_labels(fig) -> dict:
    return {ax.get_title(): sorted(line.get_label() for line in ax.lines) for ax in fig.axes}


def test_lr_and_grad_norm_panels_and_the_itm_chance_line():
    panels = _titles_and_labels(curves_figure(_rows()))
    assert panels["learning rate"] == ["train lr_cnn", "train lr_transformer_decay"]
    assert panels["gradient norm"] == ["train grad_norm"]
    assert panels["scores"] == ["chance itm_acc", "train itm_acc", "val itm_acc"]
    assert not any("epoch" in label or "peak_mem" in label for labels in panels.values() for label in labels)


def _finetune_rows(task: str) -> list[dict]:
    scores = {
        "vqa": {"overall": 41.0, "type_yes_no": 60.0, "type_number": 20.0, "num_questions": 64},
        "nlvr2": {"accuracy": 55.0, "consistency": 12.0, "num_examples": 32},
        "retrieval": {"i2t_r1": 10.0, "i2t_r5": 40.0, "t2i_r1": 12.0, "rsum": 62.0, "num_images": 8},
    }[task]
    rows = [
        {"step": s, "split": "train", "loss": 1.0 / s, "lr_transformer_decay": 5e-5, "grad_norm": 1.0} for s in (1, 2)
    ]
    return rows + [{"step": 2, "split": "dev" if task == "nlvr2" else "val", **scores}]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_a_finetuning_run_gets_its_own_keys_and_no_empty_panel(tmp_path, task):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _finetune_rows(task)))
    (tmp_path / "config.yaml").write_text(f"task: {task}\n")
    plot_run(tmp_path, tmp_path / "c.png")
    chance = chance_levels(tmp_path)
    assert chance == ({"itm_acc": 0.5, "accuracy": 50.0} if task == "nlvr2" else {"itm_acc": 0.5})
    fig = curves_figure(_finetune_rows(task), chance=chance)
    panels = _titles_and_labels(fig)
    assert all(panels.values()), panels  # every panel drawn has a curve
    split = "dev" if task == "nlvr2" else "val"
    expected = {
        "vqa": {"scores": [f"{split} overall", f"{split} type_number", f"{split} type_yes_no"]},
        "nlvr2": {"scores": ["chance accuracy", f"{split} accuracy", f"{split} consistency"]},
        "retrieval": {"retrieval R@K (%)": [f"{split} i2t_r1", f"{split} i2t_r5", f"{split} t2i_r1"]},
    }[task]
    for title, labels in expected.items():
        assert panels[title] == labels
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
