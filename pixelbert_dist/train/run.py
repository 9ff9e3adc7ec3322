"""The pre-training entry point behind ``launch/pretrain.py`` (and submitit's tasks).

Nothing heavy (torch, DeepSpeed) is imported before the arguments are parsed, so
``--help`` (every config key with its default) and ``--print-config`` answer at once."""

from __future__ import annotations

import argparse
import os
import sys

from pixelbert_dist.config import ConfigError, config_help, dump_config, load_config
from pixelbert_dist.console import setup_console
from pixelbert_dist.distributed.ds_config import resolve_deepspeed_path
from pixelbert_dist.train.config import RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pixel-BERT pre-training. Run under `deepspeed`, `torchrun`, Slurm or alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys, set as dotted key=value overrides (e.g. train.micro_batch=32 optim.lr=2e-4);\n"
        "default, (type, bounds) and help shown:\n" + "\n".join(config_help(RunConfig)),
    )
    parser.add_argument("--deepspeed_config", help="ZeRO + precision JSON (deepspeed_configs/); required to train")
    parser.add_argument("--config", help="run config YAML (launch/configs/)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the merged config (defaults <- --config <- overrides) as YAML and exit",
    )
    parser.add_argument("--list-presets", action="store_true", help="list the model presets (model.preset=) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args(argv)
    if not (args.print_config or args.list_presets) and not args.deepspeed_config:
        parser.error("the following arguments are required: --deepspeed_config")
    return args


def presets_table() -> str:
    """One line per registered model preset: its CNN and transformer shape."""
    from pixelbert_dist.model.presets import list_presets, preset_config

    rows = []
    for name in list_presets():
        c = preset_config(name)
        rows.append(
            f"{name:16s} {c.backbone:18s} {c.num_layers:2d} layers x {c.hidden_size:4d} hidden, "
            f"{c.num_heads:2d} heads, {c.pixel_sample_size} sampled pixels"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(presets_table(), flush=True)
        return 0
    if args.print_config:
        print(dump_config(load_config(RunConfig, args.config, args.overrides)), end="", flush=True)
        return 0
    setup_console()  # levels and noise filters, before DeepSpeed is imported
    args.deepspeed_config = str(resolve_deepspeed_path(args.deepspeed_config))
    if not os.path.isfile(args.deepspeed_config):
        raise SystemExit(
            f"--deepspeed_config {args.deepspeed_config}: no such file (a path, or the name of "
            "a file in deepspeed_configs/)"
        )
    cfg = load_config(RunConfig, args.config, args.overrides).validate()  # before torch and DeepSpeed load
    from pixelbert_dist.train.trainer import Trainer  # heavy imports after the argument check

    Trainer(cfg, args.deepspeed_config).fit()  # rank 0 ends with the summary: final / best metrics, the export
    return 0


def _is_refusal(err: Exception) -> bool:
    """A refusal past the config (these imports load torch and DeepSpeed, whose import
    prints a line of its own: a config error is known without them)."""
    from pixelbert_dist.checkpoint.files import CheckpointError
    from pixelbert_dist.checkpoint.run_folder import RunFolderError
    from pixelbert_dist.data.format.index import ShardFormatError
    from pixelbert_dist.distributed.env import LocalRanksError

    return isinstance(err, (RunFolderError, CheckpointError, ShardFormatError, LocalRanksError))


def refusals_as_one_line(label: str, call) -> int:
    """``call()``, where a run refused for a reason its message states (a bad key, a locked or
    finished run folder, a damaged checkpoint, shards not in the format, more local ranks
    than GPUs) ends as one line on stderr (rank 0 only: the other ranks stop for the same
    reason) and exit code 2, not a traceback per rank."""
    try:
        result = call()
    except Exception as err:  # not SystemExit (--help)
        if not (isinstance(err, ConfigError) or _is_refusal(err)):
            raise
        if os.environ.get("RANK", "0") == "0":
            kind = "config error: " if isinstance(err, ConfigError) else ""
            print(f"{label}: {kind}{err}", file=sys.stderr, flush=True)
        return REFUSED
    close_started_group()  # after a run that ended well only: an error path exits as it is
    return result if isinstance(result, int) else 0


def close_started_group() -> None:
    """Tear the process group down before the interpreter does (``close_process_group``:
    left to exit-time destructors, gloo's threads sometimes abort a finished rank), at the
    end of a command or benchmark that ended well; nothing when torch was never loaded
    (``--help``, a run that only submitted jobs)."""
    if "torch.distributed" in sys.modules:
        from pixelbert_dist.distributed.env import close_process_group

        close_process_group()


REFUSED = 2  # the exit code of a refusal said in one line


def end_command(code: int) -> int:
    """A command's end: a run that got going ends its process at once (``exit_process``:
    no slow interpreter teardown while a launcher waits); ``--help`` and a refusal (code 2,
    nothing built to tear down) return the code, so a caller in-process (a test) goes on."""
    if code != REFUSED and "torch.distributed" in sys.modules:
        from pixelbert_dist.distributed.env import exit_process

        exit_process(code)
    return code


def cli(argv: list[str] | None = None) -> int:
    """``launch/pretrain.py`` and ``pixelbert-pretrain``."""
    return end_command(refusals_as_one_line("pretrain", lambda: main(argv)))
