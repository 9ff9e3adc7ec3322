"""The benchmark suite at tiny sizes: each benchmark's JSON fields (not its timings), the
traffic model against hand counts and against DeepSpeed's comms logger, the scaling
arithmetic, the summary's verdicts, and gpu_check.sh's plumbing (--cpu-smoke runs the same
steps as on a GPU, at sizes a CPU finishes in seconds)."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import torch

from benchmarks import bench_scaling, summarize
from benchmarks.comm_model import Cluster, ParamCounts, Setting, efficiency, logged_elements, wire_bytes
from benchmarks.common import (
    interleaved,
    machine_info,
    machine_name,
    markdown_table,
    new_run_dir,
    results_dir,
    spread,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]

MACHINE_KEYS = {"torch", "gpu", "cpu", "cores", "commit", "date"}


# the smoke's first user pays for it: ~20 min on the loaded 2-core VM (5 pre-training launches)
SMOKE_TIMEOUT = pytest.mark.timeout(2700)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str, Path]:
    """gpu_check.sh --cpu-smoke: every step but compile and fp16 at CPU sizes. Returns the
    unpacked archive, the printed output and the output folder itself."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    unpacked = tmp_path_factory.mktemp("gpu_check_unpacked")
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        archive.extractall(unpacked, filter="data")
    return unpacked, proc.stdout, out


def _load(folder: Path, name: str) -> dict:
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["bench"] == name
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["rows"]
    assert set(data["columns"]) <= set().union(*data["rows"]) | {"speedup", "ms", "tflops", "max_err"}
    return data


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_attention_json(smoke):
    data = _load(smoke[0], "bench_attention")
    rows = data["rows"]
    assert {r["backend"] for r in rows} == {"eager", "flash", "mem_efficient", "cudnn", "math"}
    assert {r["mask"] for r in rows} == {"padded", "none"}
    ran = [r for r in rows if r["status"] == "ok"]
    assert {"eager", "math"} <= {r["backend"] for r in ran}  # exist on every machine
    for r in ran:
        assert r["seq"] == 140
        assert r["ms"] > 0
        assert r["tflops"] > 0
        assert r["max_err"] < 1e-4  # every backend computes the same attention (fp32 here)
        flops = 3 * 4 * r["batch"] * 12 * r["seq"] ** 2 * 64
        assert r["tflops"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12)
    for r in rows:
        assert r["status"] == "ok" or r["reason"]  # an unsupported backend says why


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_step_json(smoke):
    (row,) = _load(smoke[0], "bench_step")["rows"]
    assert row["status"] == "ok"
    assert row["preset"] == "tiny"
    assert row["zero"] == 2
    assert math.isfinite(row["loss"])
    assert row["loss"] > 0
    assert row["samples_per_s"] == pytest.approx(row["micro_batch"] * row["world"] / (row["step_ms"] / 1e3))
    assert row["tflops_per_gpu"] == pytest.approx(
        row["flops_per_sample"] * row["micro_batch"] / (row["step_ms"] / 1e3) / 1e12
    )
    assert row["mfu"] is None  # no peak for a CPU
    assert 0 <= row["data_wait"] < 1
    assert row["peak_mem_gib"] > 0
    assert row["params"] > 1e5


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_decode_json_and_brief(smoke):
    folder, stdout, _ = smoke
    rows = _load(folder, "bench_decode")["rows"]
    assert {r["size"] for r in rows} == {"paper", "small"}
    assert all(r["images_per_s"] > 0 for r in rows)
    brief = (folder / "brief.txt").read_text()
    assert brief in stdout  # the one-screen summary is printed
    assert "attention pretrain seq 140 (padded mask" in brief
    assert "step tiny ZeRO-2" in brief
    assert "decode pil paper" in brief
    assert "missing results" not in brief
    assert "memory tiny 128x128 mb2 checkpointing transformer" in brief
    assert "overhead tiny 64x128 mb2: trainer" in brief and "host syncs per optimizer step" in brief


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_memory_json(smoke):
    rows = _load(smoke[0], "bench_memory")["rows"]
    assert [r["mode"] for r in rows] == ["none", "transformer"]
    for r in rows:
        assert 0 < r["step_gib"] < r["peak_rss_gib"]
        assert r["step_s"] > 0
        assert math.isfinite(r["runs"][0]["loss"])
    assert rows[1]["saving_vs_none"] == pytest.approx(1 - rows[1]["peak_rss_gib"] / rows[0]["peak_rss_gib"])


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_scaling_projection_and_summary(smoke):
    folder = smoke[0]
    rows = bench_scaling.main(
        ["--preset", "pixelbert-r50", "--samples-per-gpu", "8", "64", "--micro-batch", "8", "--out", str(folder)]
    )
    settings = {r["setting"] for r in rows}
    assert len(settings) == len(rows) // len(bench_scaling.NODES) == 2 * len(bench_scaling.settings_grid([8], 8))
    for label in settings:  # more nodes never helps, and one node's NVLink beats 64 nodes' network
        effs = [r["efficiency"] for r in rows if r["setting"] == label]
        assert all(a >= b - 1e-12 for a, b in zip(effs, effs[1:]))
        assert effs[-1] < effs[0] <= 1
    # ZeRO-1 reduces once per optimizer step: accumulation buys efficiency; ZeRO-2 reduces every
    # micro-batch: the exposed communication grows with the accumulation instead
    at64 = {
        (r["stage"], r["grad_accum"], r["overlap"], r["multi_rank_allreduce"], r["bucket"]): r
        for r in rows
        if r["nodes"] == 64 and not r["regather"] and r["hpz"] == 1
    }
    assert at64[(1, 8, 0.5, True, 5e7)]["efficiency"] > at64[(1, 1, 0.5, True, 5e7)]["efficiency"]
    assert at64[(1, 8, 0.5, True, 5e7)]["exposed_comm_ms"] == pytest.approx(
        at64[(1, 1, 0.5, True, 5e7)]["exposed_comm_ms"]
    )
    assert at64[(2, 8, 0.5, True, 5e7)]["exposed_comm_ms"] > 4 * at64[(2, 1, 0.5, True, 5e7)]["exposed_comm_ms"]
    assert (folder / "bench_scaling.png").stat().st_size > 1000
    summary = summarize.summarize(folder).read_text()
    for name in ("bench_attention", "bench_step", "bench_scaling", "bench_decode", "bench_memory"):
        assert f"## {name}" in summary
    assert summary.count("- Compared against:") == summary.count("\n## ")
    assert "- Verdict:" in summary
    assert "setting(s) at >= 90% on 64 nodes" in summary
    assert "| torch |" in summary
    assert "![bench_step](bench_step.png)" in summary
    assert (folder / "bench_attention.png").is_file()


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_scaling_refuses_a_cpu_step_time(smoke):
    with pytest.raises(SystemExit, match="measured on a CPU"):
        bench_scaling.main(
            [
                "--step-json",
                str(smoke[0] / "bench_step.json"),
                "--preset",
                "tiny",
                "--micro-batch",
                "2",
                "--out",
                str(smoke[0] / "refused"),
            ]
        )


def test_logged_traffic_per_zero_stage():
    """The bytes DeepSpeed logs per optimizer step (comm_model's reading of its code), by hand."""
    counts = ParamCounts(trainable=100, total=120, persistent=20)

    def logged(stage, accum, **zero):
        ds = {"gradient_accumulation_steps": accum, "zero_optimization": {"stage": stage, **zero}}
        return logged_elements(counts, ds, world=4)

    assert logged(1, 4) == {"all_reduce": 100, "all_gather_into_tensor": 25}  # once per step
    assert logged(2, 4) == {"all_reduce": 400, "all_gather_into_tensor": 25}  # every micro-batch
    assert logged(2, 4, use_multi_rank_bucket_allreduce=False) == {"reduce": 400, "all_gather_into_tensor": 25}
    assert logged(3, 4) == {"reduce_scatter_tensor": 400, "all_gather_into_tensor": (4 * 100 + 20) / 4}
    assert logged(3, 4, stage3_max_reuse_distance=10) == {
        "reduce_scatter_tensor": 400,
        "all_gather_into_tensor": (8 * 100 + 20) / 4,
    }
    # on the wire (ring): all-reduce 2 (n-1)/n, all-gather (n-1)/n of the gathered whole
    assert wire_bytes({"all_reduce": 100.0, "all_gather_into_tensor": 25.0}, 4) == pytest.approx(150 + 75)
    with pytest.raises(ValueError, match="stages 1, 2 and 3"):
        logged(0, 1)


def test_more_bandwidth_less_exposed_time():
    counts = ParamCounts(trainable=10**8, total=10**8, persistent=0)
    slow, fast = Cluster(inter_gbs=10.0), Cluster(inter_gbs=100.0)
    setting = Setting(stage=2, grad_accum=4)
    assert (
        efficiency(counts, setting, 64, 0.05, fast)["efficiency"]
        > efficiency(counts, setting, 64, 0.05, slow)["efficiency"]
    )
    assert efficiency(counts, setting, 1, 0.05, slow)["efficiency"] == 1


@pytest.mark.launcher
def test_predicted_bytes_match_the_comms_logger(tmp_path):
    """bench_comms on 2 gloo ranks through the real launcher: the model's bytes per optimizer
    step against DeepSpeed's comms logger, tiny, ZeRO-2 with accumulation (reduces per micro-batch)."""
    from tests.pretrain_helpers import run_launcher

    run_launcher(
        "benchmarks.bench_comms",
        ["--presets", "tiny", "--zero", "2", "--grad-accum", "2", "--steps", "1", "--out", str(tmp_path)],
        module=True,
    )
    rows = json.loads((tmp_path / "bench_comms.json").read_text())["rows"]
    (total,) = [r for r in rows if r["op"] == "TOTAL"]
    assert abs(total["error"]) <= 0.05, rows
    reduce = next(r for r in rows if r["op"] == "all_reduce")
    gather = next(r for r in rows if r["op"] == "all_gather_into_tensor")
    assert reduce["measured_mb"] == pytest.approx(4 * gather["measured_mb"], rel=0.01)  # 2 reductions, half shards


def test_common_helpers(tmp_path, monkeypatch):
    info = machine_info()
    assert MACHINE_KEYS <= set(info)
    assert info["torch"]
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "r"))
    assert results_dir() == tmp_path / "r"
    assert (tmp_path / "r").is_dir()
    table = markdown_table([{"a": 1.23456, "b": None}], ["a", "b"])
    assert table.splitlines()[2] == "| 1.23 | - |"
    first, second = new_run_dir("cpu-smoke", tmp_path), new_run_dir("cpu smoke", tmp_path)
    assert first.name == f"{machine_name()}-{datetime.date.today().isoformat()}-cpu-smoke"  # results/'s scheme
    assert second.name == f"{first.name}-2"  # the same day's second run: never shared
    assert second.is_dir()
    stats = spread([3.0, 1.0, 2.0, 2.0])
    assert stats["median"] == 2.0
    assert stats["spread"] == pytest.approx(0.5)
    order = []
    times = interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, torch.device("cpu"), warmup=1, repeats=2
    )
    assert order == ["a", "b"] * 3
    assert [len(v) for v in times.values()] == [2, 2]
    assert verdict(0.45, 0.4) == "met"
    assert verdict(0.06, 0.05, higher_is_better=False) == "not met"


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_gpu_check_brings_back_one_archive_and_the_brief(smoke):
    """A device call brings back at most 8 files: the output folder holds the archive and
    the brief; the archive holds every step's log, JSON, the plots and the summary."""
    unpacked, stdout, out = smoke
    assert sorted(p.name for p in out.iterdir()) == ["brief.txt", "gpu_check.tar.gz"]
    assert (out / "brief.txt").read_text() == (unpacked / "brief.txt").read_text()
    logs = {p.stem for p in (unpacked / "logs").iterdir()}
    assert {"preflight", "e2e", "fp32", "zero3", "train_step", "attention", "memory", "overhead", "decode"} <= logs
    assert {"summary.md", "gpu_check.log", "bench_attention.png"} <= {p.name for p in unpacked.iterdir()}
    assert not any(json.loads(p.read_text()).get("partial") for p in unpacked.glob("*.json"))
    assert "gpu_check.tar.gz" in stdout.splitlines()[-1]


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_preflight_rows(smoke):
    rows = {r["check"]: r for r in _load(smoke[0], "preflight")["rows"]}
    assert list(rows) == ["versions", "imports", "distutils", "all_reduce"]  # CUDA checks: GPU only
    assert all(r["ok"] for r in rows.values()), rows
    assert "gloo all-reduce" in rows["all_reduce"]["detail"]
    assert "typing_extensions" in rows["versions"]["detail"]


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_pretrain_rows_resume_equals_uninterrupted(smoke):
    """launch/pretrain.py stopped by SIGTERM and resumed logs the uninterrupted run's losses
    (bit for bit on a CPU); it evaluated and exported. The fp32 phase repeats the e2e run's
    first steps (fp32 on a CPU too): the same losses."""
    rows = {r["phase"]: r for r in _load(smoke[0], "bench_pretrain")["rows"]}
    assert list(rows) == ["e2e", "fp32", "zero3"]
    assert all(r["verdict"] == "ok" for r in rows.values()), rows
    e2e = rows["e2e"]
    assert e2e["steps"] == 6 and len(e2e["losses"]) == 6
    assert 1 <= e2e["stopped_at"] < 6
    assert e2e["max_diff_after_resume"] == 0 and e2e["max_diff_before_stop"] == 0
    assert e2e["exported"] and e2e["val"]["itm_acc"] is not None
    assert rows["fp32"]["max_rel_diff_vs_e2e"] == 0
    assert rows["zero3"]["zero"] == 3 and rows["zero3"]["steps"] == 4
    assert all(math.isfinite(v) for v in e2e["losses"])


def test_gpu_check_help_and_budgets():
    """--help answers; the GPU budgets fit 420 s with the install, the preflight 20 s."""
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage:")
    lines = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, timeout=60).stdout
    steps = [line.split("]")[0].strip("[").split() for line in lines.splitlines() if line.startswith("[")]
    limits = {name: int(seconds.rstrip("s")) for name, seconds in steps}
    assert steps[0][0] == "preflight" and limits["preflight"] <= 20
    assert [name for name, _ in steps][-2:] == ["compile", "summary"]
    total = int(lines.split("budgets: ")[1].split()[0])
    assert total <= 420 and sum(limits.values()) < total  # the rest: the wheels' install


@pytest.mark.slow
def test_a_failed_preflight_stops_the_run_in_one_line(tmp_path):
    """The preflight refuses the machine: one line says why, no other step runs, and the
    archive still comes back with the preflight's log."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$2" = benchmarks.gpu_preflight ]; then\n'
        '  echo "gpu_check: this machine cannot run the check: cuda: torch sees no CUDA device" >&2; exit 3\n'
        "fi\n"
        f'echo "$2" >>{tmp_path}/ran; exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": str(fake)},
    )
    assert proc.returncode == 1
    said = "gpu_check: this machine cannot run the check: cuda: torch sees no CUDA device; the other steps are skipped"
    assert said in proc.stdout.splitlines()
    assert "== e2e" not in proc.stdout
    assert (tmp_path / "ran").read_text().split() == ["benchmarks.summarize"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        assert "./logs/preflight.log" in archive.getnames()


def test_partial_rows_are_written_and_briefed(tmp_path):
    """A step stopped by its time limit keeps the rows it wrote; the brief says how far a
    cold compile got."""
    from benchmarks.common import write_results

    row = {"preset": "pixelbert-r50", "precision": "bf16", "micro_batch": 8, "eager_ms": 100.0}
    row.update(compile_s=61.0, verdict="compiled, timing")
    write_results("bench_compile", [row], {}, tmp_path, ["preset"], partial=True)
    assert json.loads((tmp_path / "bench_compile.json").read_text())["partial"] is True
    text = summarize.brief(tmp_path)
    assert "compile pixelbert-r50 bf16 mb8: stopped while compiled, timing: eager 100.0 ms" in text
    assert "first compiled step 61 s" in text
    assert "stopped before their last row (time limit?): ['bench_compile']" in text


def _arguments(lines: list[str], module: str, marker: str = "") -> list[str]:
    """The arguments of the first dry-run line that runs ``-m benchmarks.<module>`` (with ``marker``)."""
    line = next(line for line in lines if f"-m benchmarks.{module} " in line and marker in line)
    return line.split(f"-m benchmarks.{module} ")[1].split()


def test_gpu_check_dry_run_uses_real_flags():
    """The GPU-only commands parse with the benchmarks' own argument parsers."""
    from benchmarks import bench_attention, bench_compile, bench_memory, bench_step

    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    assert bench_attention.parse(_arguments(out, "bench_attention")).iters == 30
    args = bench_step.parse(_arguments(out, "bench_step"))
    assert args.presets == ["pixelbert-r50"]
    assert args.precision == ["bf16"]
    assert args.image == [800, 1333]
    assert args.sampling == ["on", "off"]
    memory = bench_memory.parse(_arguments(out, "bench_memory"))
    assert memory.image == [800, 1333]
    assert memory.micro_batch == 2
    args = bench_step.parse(_arguments(out, "bench_step", "--overhead"))
    assert args.overhead and args.presets == ["pixelbert-r50"] and args.image == [800, 1333]
    assert bench_compile.parse(_arguments(out, "bench_compile")).presets == ["pixelbert-r50"]


def test_bench_index_says_what_it_writes_before_writing(tmp_path, monkeypatch, capsys):
    """The shard split bench_index builds (2.6 GB at 10^6 samples): the size and folder are
    said before the first byte, within 5% of what lands on disk; a second run reuses it."""
    from benchmarks import bench_index

    monkeypatch.setattr(bench_index, "CACHE", tmp_path / "cache")
    directory = bench_index.build_largest(3000)
    said = capsys.readouterr().out.splitlines()[0]
    match = re.fullmatch(r"bench_index: writing ~([\d.]+) MB \(3000 samples\) into (\S+) \(.* free there\).*", said)
    assert match, said
    assert Path(match.group(2)) == directory
    written = sum(f.stat().st_size for f in directory.iterdir() if f.suffix != ".json")
    assert float(match.group(1)) * 1e6 == pytest.approx(written, rel=0.05)
    bench_index.build_largest(3000)
    assert "reusing the 3000-sample split" in capsys.readouterr().out


@pytest.mark.slow
def test_plan_bench_rows(tmp_path):
    """bench_index.py --plan: a row per tree and size, each tree measured in its own process
    (the baseline here is this tree again: the plumbing, not the figures)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_index", "--plan", "--sizes", "100000"]
        + ["--baseline", str(REPO), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = _load(tmp_path, "bench_plan")
    assert [(r["code"], r["samples"]) for r in data["rows"]] == [("lazy", 100000), ("baseline", 100000)]
    for row in data["rows"]:
        assert row["batches"] == -(-100000 // 8 // 32)
        assert 0 < row["tracemalloc_peak_mb"] < 5, row  # one window, not the 100,000 samples


@pytest.mark.slow
@SMOKE_TIMEOUT
def test_overhead_rows_split_the_step(smoke):
    """bench_step.py --overhead on tiny (the smoke run's): per repeat, each loop's time
    outside the engine is a positive part of its step, and the framework share is that
    difference over the bare step (the plumbing: no timing is asserted)."""
    (row,) = _load(smoke[0], "bench_step_overhead_tiny")["rows"]
    for loop in ("trainer", "bare"):
        outside, steps = row[f"outside_ms_{loop}"], row[f"{loop}_ms_all"]
        assert len(outside) == len(steps) == 2
        assert all(0 < o < s for o, s in zip(outside, steps)), (loop, outside, steps)
    assert row["framework_share"] == pytest.approx(row["framework_ms"] / row["bare_ms"])
    # host syncs (CPU: the calls that would sync a GPU): the engine's own, the same in both
    # loops, and the trainer's one NaN/inf check per optimizer step (4 steps, no log yet)
    trainer, bare = row["sync_sites_trainer"], row["sync_sites_bare"]
    assert bare and all(trainer.get(site) == count for site, count in bare.items()), (trainer, bare)
    extra = {site: count for site, count in trainer.items() if site not in bare}
    assert list(extra.values()) == [4] and "train/window.py" in next(iter(extra)), extra
    assert row["trainer_syncs"] == pytest.approx(row["bare_syncs"] + 1)


@pytest.mark.slow
def test_bench_loader_peer_times_every_contender_on_the_same_shards(tmp_path):
    """The peer, pil and dali-cpu each time real batches in their own process (1 each)."""
    from benchmarks import bench_loader_peer

    argv = ["--repeats", "1", "--batches", "1", "--batch-size", "2", "--shorter", "64", "--max-size", "96"]
    bench_loader_peer.main([*argv, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_loader_peer.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == list(bench_loader_peer.CONTENDERS)
    assert all(r["images"] == 2 and r["images_per_s"] > 0 and r["cpu_ms_per_image"] >= 0 for r in rows)
    assert rows[0]["vs_peer"] == 1.0  # CPU figures of 2 tiny images may be under a clock tick
    summary = json.loads((tmp_path / "bench_loader_peer_summary.json").read_text())["rows"]
    assert [r["contender"] for r in summary] == list(bench_loader_peer.CONTENDERS)


def test_bench_loader_peer_runs_the_baseline_trees_dali_cpu_beside_this_one(tmp_path):
    """``--baseline-contenders dali-cpu``: the old tree's DALI-CPU in the same run (here
    the baseline is this tree again: the plumbing, not the figures)."""
    from benchmarks import bench_loader_peer

    argv = ["--repeats", "1", "--batches", "1", "--batch-size", "2", "--shorter", "64", "--max-size", "96"]
    argv += ["--baseline", str(REPO), "--baseline-contenders", "dali-cpu", "--out", str(tmp_path)]
    bench_loader_peer.main(argv)
    rows = json.loads((tmp_path / "bench_loader_peer.json").read_text())["rows"]
    assert [(r["contender"], r["tree"]) for r in rows] == [
        *((name, "this") for name in bench_loader_peer.CONTENDERS),
        ("dali-cpu", "baseline"),
    ]
    with pytest.raises(SystemExit, match="pick from pil, dali-cpu"):
        bench_loader_peer.main([*argv[:-2], "--baseline-contenders", "peer"])
