"""From the pre-training arguments to the jobs to submit: parse what launch/pretrain.py
takes, expand sweeps into one job per point, give each its run folder, and load each
run config as the trainer will, so a bad key fails here and not in the queue."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.distributed.ds_config import load_deepspeed_json
from pixelbert_dist.jobs.options import SubmitConfig, SubmitError
from pixelbert_dist.train.config import RunConfig


@dataclasses.dataclass
class PretrainArgs:
    deepspeed_config: str
    config: str | None
    overrides: list[str]

    def argv(self, extra: list[str] = ()) -> list[str]:
        out = ["--deepspeed_config", self.deepspeed_config]
        if self.config:
            out += ["--config", self.config]
        return out + list(self.overrides) + list(extra)


def parse_pretrain_args(argv: list[str]) -> PretrainArgs:
    """The arguments of launch/pretrain.py: --deepspeed_config PATH [--config YAML] [k=v ...]."""
    ds, cfg, overrides, i = None, None, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--deepspeed_config", "--config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SubmitError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            ds, cfg = (value, cfg) if name == "--deepspeed_config" else (ds, value)
        elif arg.startswith("--local_rank"):
            i += 0 if "=" in arg else 1  # the deepspeed launcher's; meaningless here
        elif arg.startswith("-") or "=" not in arg:
            raise SubmitError(f"pre-training argument {arg!r} is neither --deepspeed_config, --config nor key=value")
        else:
            overrides.append(arg)
        i += 1
    if not ds:
        raise SubmitError(
            "the pre-training arguments (after --) need --deepspeed_config PATH, "
            "e.g. -- --deepspeed_config deepspeed_configs/zero2.json"
        )
    return PretrainArgs(ds, cfg, overrides)


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas inside brackets belong to a value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return values + [current]


def expand_sweep(sweep: tuple[str, ...] | list[str]) -> list[list[str]]:
    """``["lr=1e-4,2e-4", "train.micro_batch=8,16"]`` -> one override list per job."""
    axes = []
    for spec in sweep:
        key, eq, values = spec.partition("=")
        vals = [v.strip() for v in _split_values(values)] if eq else []
        if not key.strip() or not vals or any(v == "" for v in vals):
            raise SubmitError(f"--sweep {spec!r}: use key=v1,v2[,...] with no empty value")
        axes.append([f"{key.strip()}={v}" for v in vals])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _label(overrides: list[str]) -> str:
    text = "_".join(o.replace("=", "-") for o in overrides) or "run"
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text)[:120]


def validate_run_config(args: PretrainArgs, extra: list[str]):
    """Load the run config as the trainer will, so a bad key fails here, not in the queue."""
    try:
        load_deepspeed_json(args.deepspeed_config)
        cfg = load_config(RunConfig, args.config, list(args.overrides) + list(extra))
        return cfg.validate()
    except (ConfigError, ValueError, TypeError) as err:
        raise SubmitError(str(err)) from None


@dataclasses.dataclass
class JobPlan:
    label: str
    argv: list[str]
    run_dir: str


def plan_jobs(opts: SubmitConfig, args: PretrainArgs) -> list[JobPlan]:
    """One job per sweep point, each validated and with its own run_dir."""
    out_dir = Path(opts.output_dir).resolve()
    user_run_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run_dir=")), None)
    points = expand_sweep(opts.sweep)
    plans = []
    for point in points:
        if len(points) == 1:
            run_dir = user_run_dir or str(out_dir / "run")
        else:
            run_dir = str(Path(user_run_dir or out_dir / "runs") / _label(point))
        extra = point + [f"run_dir={Path(run_dir).resolve()}"]
        validate_run_config(args, extra)
        plans.append(JobPlan(_label(point), args.argv(extra), str(Path(run_dir).resolve())))
    return plans
