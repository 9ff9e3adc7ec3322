"""Where a run's metrics go besides ``metrics.jsonl`` (``train.report_to``): TensorBoard and
Weights & Biases. ``metrics.RunLogger`` hands every writer here the very rows it writes to
``metrics.jsonl``, so each holds the same values at the same steps.

W&B runs through its own library (the ``wandb`` extra). Its run id is kept in the run folder
(``wandb_run_id``): a resumed run continues the same W&B run. W&B's ``_step`` is only a row
counter here: every row carries the optimiser step as ``step``, W&B's x axis for all keys,
so a resumed run's rows never collide with what the interrupted run logged (W&B cannot
take rows back; ``metrics.jsonl`` and TensorBoard set the superseded ones apart)."""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

REPORT_TO = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


def check_report_to(report_to: list[str]) -> None:
    """Refuse, before any training, a tracker whose library is not installed."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "train.report_to includes 'wandb' but the wandb package is not installed: "
            "pip install 'pixelbert_dist[wandb]', or drop wandb from train.report_to"
        )


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train.lr": ...} from {"train": {"lr": ...}}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoardWriter:
    """Scalars under ``split/key``; a run resumed at step T hides the events of the steps
    after T that the interrupted run had logged (``purge_step``)."""

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_step + 1 if resumed_step else None
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, split: str, values: dict[str, float], labels: dict[str, str]) -> None:
        for key, value in values.items():  # scalars only: text labels have no place here
            self.tb.add_scalar(f"{split}/{key}", value, step)

    def log_config(self, config: dict) -> None:
        """The resolved config as YAML text, and as hparams (flat keys)."""
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self.tb.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        for summary in hparams(flat, {"train/loss": 0.0}):
            self.tb.file_writer.add_summary(summary)

    def close(self) -> None:
        self.tb.close()


def wandb_run_id(run_dir: Path, resumed_step: int) -> str:
    """The W&B run id of this run folder: the stored one when the run resumed a checkpoint,
    a new one (stored) when it starts from step 0."""
    path = run_dir / WANDB_ID_FILE
    if resumed_step and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own ids: 8 lowercase letters and digits
    path.write_text(run_id + "\n")
    return run_id


class WandbWriter:
    """One W&B run per run folder (rank 0 only, like every writer). ``WANDB_MODE=offline``
    writes it under ``WANDB_DIR`` (default: the run folder) for ``wandb sync`` later."""

    def __init__(self, run_dir: Path, resumed_step: int, project: str):
        import wandb

        run_id = wandb_run_id(run_dir, resumed_step)
        self.run = wandb.init(
            project=project,
            id=run_id,
            name=run_dir.name,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, split: str, values: dict[str, float], labels: dict[str, str]) -> None:
        self.run.log({"step": step, **{f"{split}/{key}": value for key, value in {**values, **labels}.items()}})

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def open_writers(run_dir: Path, report_to: list[str], resumed_step: int, wandb_project: str) -> list:
    writers = []
    if "tensorboard" in report_to:
        writers.append(TensorBoardWriter(run_dir, resumed_step))
    if "wandb" in report_to:
        writers.append(WandbWriter(run_dir, resumed_step, wandb_project))
    return writers
