"""The GPU check's first step (<= 20 s): can this machine run the rest?

    python -m benchmarks.gpu_preflight --out RESULTS [--cpu]

Versions; the import of every module the later steps use; a one-rank NCCL all-reduce
(gloo with ``--cpu``); the GPU's capability, memory, a bf16 matmul, an nvJPEG decode and a
fused AdamW step. Each check is a row of ``RESULTS/preflight.json``, written as it finishes.
A check the rest cannot do without ("fatal") ends the run with exit code 3 and one line
naming it, so the GPU check stops before spending its minutes on steps that would fail.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import io
import os
import sys
import time
from pathlib import Path

from benchmarks.common import write_results

COLUMNS = ["check", "ok", "fatal", "seconds", "detail"]
# what later steps import: the benchmarks, the trainer, the export, the summary's plots
MODULES = [
    "deepspeed",
    "pydantic",
    "hjson",
    "transformers",
    "safetensors",
    "yaml",
    "psutil",
    "matplotlib",
    "torchvision.io",
    "pixelbert_dist.train.trainer",
    "pixelbert_dist.train.export",
    "pixelbert_dist.data.loader",
    "benchmarks.bench_attention",
    "benchmarks.bench_step",
    "benchmarks.bench_memory",
    "benchmarks.bench_compile",
    "benchmarks.bench_data",
    "benchmarks.host_syncs",
    "benchmarks.summarize",
    "benchmarks.gpu_pretrain",
    "benchmarks.gpu_decode",
]
PACKAGES = ["torch", "torchvision", "transformers", "deepspeed", "pydantic", "typing_extensions", "setuptools"]
MIN_TYPING_EXTENSIONS = (4, 14)  # pydantic 2.14's floor
MIN_FREE_GIB = 40.0  # R50 bf16 at 800x1333, micro-batch 16, plus the allocator's slack


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def versions(cpu: bool) -> str:
    import torch

    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    te = found["typing_extensions"]
    if te is None or _version_tuple(te) < MIN_TYPING_EXTENSIONS:
        raise RuntimeError(f"typing_extensions {te} < 4.14 (pydantic needs it): carry a newer wheel in .whl/")
    extra = "" if cpu else f" cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}"
    nccl = "" if cpu else f" nccl {'.'.join(map(str, torch.cuda.nccl.version()))}"
    return f"python {sys.version.split()[0]}{extra}{nccl} " + " ".join(f"{k} {v}" for k, v in found.items())


def imports(_cpu: bool) -> str:
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the run stops
            failed.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    if failed:
        raise RuntimeError(
            "cannot import " + "; ".join(failed) + " (the GPU machine's missing packages travel as wheels: "
            "bash benchmarks/gpu_wheels.sh here, then carry .whl)"
        )
    return f"{len(MODULES)} modules"


def distutils_shim(_cpu: bool) -> str:
    """DeepSpeed's op-compatibility probe (AIO) imports distutils, gone from Python 3.12's
    standard library: setuptools' shim must answer (DeepSpeed only warns without it)."""
    import distutils.ccompiler  # noqa: F401

    return f"distutils from {Path(distutils.ccompiler.__file__).parent}"


def all_reduce(cpu: bool) -> str:
    """A one-rank process group on the backend training uses, and one all-reduce."""
    import torch
    import torch.distributed as dist

    backend = "gloo" if cpu else "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        value = torch.full((1024,), 3.0, device=device)
        dist.all_reduce(value)
        if not bool((value == 3.0).all()):
            raise RuntimeError(f"{backend} all-reduce over one rank changed the values")
    finally:
        dist.destroy_process_group()
    return f"{backend} all-reduce of 1024 floats on {device}"


def cuda_device(_cpu: bool) -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (--cpu-smoke checks the plumbing on a CPU)")
    props = torch.cuda.get_device_properties(0)
    free, total = (v / 2**30 for v in torch.cuda.mem_get_info(0))
    if not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{props.name} (sm_{props.major}{props.minor}) has no bf16: the check's steps need it")
    if free < MIN_FREE_GIB:
        raise RuntimeError(f"{props.name}: {free:.1f} of {total:.1f} GiB free, the steps need {MIN_FREE_GIB:.0f}")
    a = torch.randn(1024, 1024, device="cuda")
    rel = ((a.bfloat16() @ a.bfloat16()).float() - a @ a).norm() / (a @ a).norm()
    if not rel < 2e-2:
        raise RuntimeError(f"bf16 matmul relative error {rel:.3g} vs fp32")
    torch.cuda.reset_peak_memory_stats()
    return (
        f"{props.name} sm_{props.major}{props.minor}, {torch.cuda.device_count()} device(s), "
        f"{free:.1f}/{total:.1f} GiB free, bf16 matmul rel err {rel:.1e}, "
        f"allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB"
    )


def nvjpeg(_cpu: bool) -> str:
    """The e2e step's decoder: torchvision's decode_jpeg on the GPU."""
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 10)).save(buffer, format="JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    image = decode_jpeg([data], device="cuda")[0]
    if tuple(image.shape) != (3, 48, 64) or abs(int(image[0].float().mean()) - 200) > 8:
        raise RuntimeError(f"nvJPEG decoded a {tuple(image.shape)} image, red mean {image[0].float().mean():.0f}")
    return "decode_jpeg on cuda: 64x48 JPEG ok"


def fused_adamw(_cpu: bool) -> str:
    import torch

    weight = torch.nn.Parameter(torch.ones(256, device="cuda"))
    weight.grad = torch.ones_like(weight)
    torch.optim.AdamW([weight], lr=0.1, fused=True).step()
    if not torch.allclose(weight, torch.full_like(weight, 0.9 - 0.1 * 0.01), atol=1e-5):
        raise RuntimeError("fused AdamW step gave the wrong weights")
    return "one fused AdamW step"


# (name, function, fatal, GPU only)
CHECKS = [
    ("versions", versions, True, False),
    ("imports", imports, True, False),
    ("distutils", distutils_shim, False, False),
    ("cuda", cuda_device, True, True),
    ("all_reduce", all_reduce, True, False),
    ("nvjpeg", nvjpeg, True, True),
    ("fused_adamw", fused_adamw, False, True),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (preflight.json)")
    parser.add_argument("--cpu", action="store_true", help="no CUDA checks; gloo instead of NCCL")
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rows, config = [], {"target": "every fatal check ok, in <= 20 s", "cpu": args.cpu}
    for name, check, fatal, gpu_only in CHECKS:
        if gpu_only and args.cpu:
            continue
        start = time.perf_counter()
        try:
            ok, detail = True, check(args.cpu)
        except Exception as err:  # noqa: BLE001 - a failed check is a row, not a traceback
            ok, detail = False, f"{type(err).__name__}: {err}"
        rows.append({"check": name, "ok": ok, "fatal": fatal, "seconds": time.perf_counter() - start, "detail": detail})
        print(f"preflight {name}: {'ok' if ok else 'FAILED'} ({rows[-1]['seconds']:.1f} s): {detail}", flush=True)
        write_results("preflight", rows, config, args.out, COLUMNS, partial=True)
        if fatal and not ok:
            print(f"gpu_check: this machine cannot run the check: {name}: {detail}", file=sys.stderr, flush=True)
            return 3
    write_results("preflight", rows, config, args.out, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
