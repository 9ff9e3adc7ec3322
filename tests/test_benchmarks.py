"""The benchmark suite at tiny sizes: each benchmark's JSON fields (not its timings), the
scaling model's arithmetic, the summary, and gpu_check.sh's plumbing (--cpu-smoke runs
the same steps as on a GPU, at sizes a CPU finishes in seconds)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_scaling  # noqa: E402
import summarize  # noqa: E402
from common import machine_info, markdown_table, results_dir  # noqa: E402

MACHINE_KEYS = {"torch", "gpu", "cpu", "cores", "commit", "date"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    """gpu_check.sh --cpu-smoke: bench_attention, bench_step, the decode step, the brief."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "gpu_check.log").read_text()
    return out, proc.stdout


def _load(folder: Path, name: str) -> dict:
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["bench"] == name and MACHINE_KEYS <= set(data["machine"])
    assert data["rows"] and set(data["columns"]) <= set().union(*data["rows"]) | {"speedup", "ms",
                                                                                 "tflops", "max_err"}
    return data


def test_attention_json(smoke):
    data = _load(smoke[0], "bench_attention")
    rows = data["rows"]
    assert {r["backend"] for r in rows} == {"eager", "flash", "mem_efficient", "cudnn", "math"}
    assert {r["mask"] for r in rows} == {"padded", "none"}
    ran = [r for r in rows if r["status"] == "ok"]
    assert {"eager", "math"} <= {r["backend"] for r in ran}  # exist on every machine
    for r in ran:
        assert r["seq"] == 140 and r["ms"] > 0 and r["tflops"] > 0
        assert r["max_err"] < 1e-4  # every backend computes the same attention (fp32 here)
        flops = 3 * 4 * r["batch"] * 12 * r["seq"] ** 2 * 64
        assert r["tflops"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12)
    for r in rows:
        assert r["status"] == "ok" or r["reason"]  # an unsupported backend says why


def test_step_json(smoke):
    (row,) = _load(smoke[0], "bench_step")["rows"]
    assert row["status"] == "ok" and row["preset"] == "tiny" and row["zero"] == 2
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert row["samples_per_s"] == pytest.approx(row["micro_batch"] * row["world"] / (row["step_ms"] / 1e3))
    assert row["tflops_per_gpu"] == pytest.approx(
        row["flops_per_sample"] * row["micro_batch"] / (row["step_ms"] / 1e3) / 1e12)
    assert row["mfu"] is None  # no peak for a CPU
    assert 0 <= row["data_wait"] < 1 and row["peak_mem_gib"] > 0 and row["params"] > 1e5


def test_decode_json_and_brief(smoke):
    folder, stdout = smoke
    rows = _load(folder, "bench_decode")["rows"]
    assert {r["size"] for r in rows} == {"paper", "small"} and all(r["images_per_s"] > 0 for r in rows)
    brief = (folder / "brief.txt").read_text()
    assert brief in stdout  # the one-screen summary is printed
    assert "attention pretrain seq 140 (padded mask" in brief and "step tiny ZeRO-2" in brief
    assert "decode pil paper" in brief and "missing results" not in brief


def test_scaling_model_and_summary(smoke, tmp_path):
    folder = smoke[0]
    rows = bench_scaling.main(["--step-json", str(folder / "bench_step.json"), "--project",
                               "pixelbert-r50", "--micro-batch", "8", "--out", str(folder)])
    measured = [r for r in rows if r["source"].startswith("measured")]
    assert [r["gpus"] for r in measured] == [1, 8, 16, 32, 64, 128, 256, 512]
    assert measured[0]["comm_ms"] == 0 and measured[0]["efficiency"] == 1
    projected = [r for r in rows if r["source"].startswith("projected")]
    effs = [r["efficiency"] for r in projected]
    assert all(a >= b for a, b in zip(effs, effs[1:])) and effs[-1] < 1  # more nodes, less efficient
    assert (folder / "bench_scaling.png").stat().st_size > 1000
    summary = summarize.summarize(folder).read_text()
    for name in ("bench_attention", "bench_step", "bench_scaling", "bench_decode"):
        assert f"## {name}" in summary
    assert "ring" in summary and "| torch |" in summary and "![bench_step](bench_step.png)" in summary
    assert (folder / "bench_attention.png").is_file() and (folder / "bench_step.png").is_file()


def test_ring_traffic_by_zero_stage():
    # 100M bf16 parameters over 16 GPUs (2 nodes) at 50 GB/s per GPU, no latency
    args = dict(params=100_000_000, precision="bf16", gpus=16, gpus_per_node=8, intra_gbs=400.0,
                inter_gbs_per_gpu=50.0, alpha_us=0.0, bucket=50_000_000)
    zero2 = bench_scaling.comm_seconds(stage=2, **args)
    assert zero2 == pytest.approx(2 * 15 / 16 * 100e6 * 2 / 50e9)
    assert bench_scaling.comm_seconds(stage=3, **args) == pytest.approx(1.5 * zero2)
    assert bench_scaling.comm_seconds(stage=2, **{**args, "gpus": 1}) == 0


def test_common_helpers(tmp_path, monkeypatch):
    info = machine_info()
    assert MACHINE_KEYS <= set(info) and info["torch"]
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "r"))
    assert results_dir() == tmp_path / "r" and (tmp_path / "r").is_dir()
    table = markdown_table([{"a": 1.23456, "b": None}], ["a", "b"])
    assert table.splitlines()[2] == "| 1.23 | - |"


def test_gpu_check_dry_run_uses_real_flags():
    """The GPU-only commands parse with the benchmarks' own argument parsers."""
    import bench_attention
    import bench_step

    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=60).stdout.splitlines()
    attention = next(l for l in out if "bench_attention.py" in l).split("bench_attention.py ")[1].split()
    step = next(l for l in out if "bench_step.py" in l).split("bench_step.py ")[1].split()
    assert bench_attention.parse(attention).iters == 30
    args = bench_step.parse(step)
    assert args.presets == ["pixelbert-r50"] and args.precision == ["bf16"] and args.image == [800, 1333]
    assert args.sampling == ["on", "off"]
