"""Attention kernels at Pixel-BERT's shapes: SDPA backends (FlashAttention, memory-efficient,
cuDNN, math) against the eager formula, forward + backward, time and TFLOP/s.

    python -m benchmarks.bench_attention            # GPU: bf16, batch 32
    python -m benchmarks.bench_attention --quick    # a few iterations (the CPU smoke run)

Shapes: BERT-base heads (12 x 64); a sequence of 40 text tokens + 100 sampled pixels in
pre-training, + 300 / 500 pixels in fine-tuning (all pixels of 600x1000 / 800x1333 images
after 64x downsampling). Two masks: ``padded`` is the model's real case (a boolean key
mask: padded text tokens and the padding pixels of smaller images), ``none`` is what the
FlashAttention kernel needs (it takes no arbitrary mask). A backend that cannot run a
case is listed as unsupported, with torch's reason. FLOPs: 4·B·H·S²·D forward, 3x that
for forward + backward (the work done, not counting FlashAttention's recomputation).
"""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING

from benchmarks.common import median, time_fn, write_results

if TYPE_CHECKING:  # torch is imported where it is used: --help answers without it
    import torch

SHAPES = {"pretrain-100px": (40, 100), "finetune-300px": (40, 300), "finetune-500px": (40, 500)}
BACKENDS = {  # name -> torch.nn.attention.SDPBackend member
    "flash": "FLASH_ATTENTION",
    "mem_efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
COLUMNS = ["shape", "seq", "batch", "mask", "backend", "dtype", "ms", "tflops", "speedup", "max_err", "status"]


def make_inputs(
    batch: int,
    text: int,
    pixels: int,
    heads: int,
    dim: int,
    masked: bool,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
):
    import torch

    gen = torch.Generator().manual_seed(seed)
    seq = text + pixels
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen).to(device, dtype) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if masked:  # captions of different lengths; every other image smaller (padding pixels)
        lengths = torch.randint(text // 3, text + 1, (batch,), generator=gen)
        mask[:, :text] = torch.arange(text) < lengths[:, None]
        mask[1::2, text + pixels * 3 // 4 :] = False
    return q, k, v, mask[:, None, None, :].to(device)


def attention_fn(backend: str, q, k, v, mask):
    """A closure running forward + backward once with ``backend``."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pixelbert_dist.model.encoder import eager_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.ones_like(q)

    def run():
        if backend == "eager":
            out = eager_attention(q, k, v, mask)
        else:
            with sdpa_kernel([getattr(SDPBackend, BACKENDS[backend])]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        return out

    return run


def reference(q, k, v, mask) -> torch.Tensor:
    from pixelbert_dist.model.encoder import eager_attention

    return eager_attention(q.double(), k.double(), v.double(), mask)


def forward_error(backend: str, q, k, v, mask, ref: torch.Tensor) -> float:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pixelbert_dist.model.encoder import eager_attention

    with torch.no_grad():
        if backend == "eager":
            out = eager_attention(q, k, v, mask)
        else:
            with sdpa_kernel([getattr(SDPBackend, BACKENDS[backend])]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return float((out.double() - ref).abs().max())


def bench_case(shape: str, batch: int, masked: bool, args, device, dtype) -> list[dict]:
    text, pixels = SHAPES[shape]
    q, k, v, mask = make_inputs(batch, text, pixels, args.heads, args.head_dim, masked, device, dtype)
    ref = reference(q, k, v, mask)
    seq = text + pixels
    flops = 3 * 4 * batch * args.heads * seq * seq * args.head_dim
    rows = []
    for backend in ["eager", *BACKENDS]:
        row = {
            "shape": shape,
            "seq": seq,
            "batch": batch,
            "mask": "padded" if masked else "none",
            "backend": backend,
            "dtype": str(dtype).replace("torch.", ""),
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns before raising "no kernel"
                # eager always takes the (all-True when unmasked) mask; SDPA gets None then
                use = mask if masked or backend == "eager" else None
                row["max_err"] = forward_error(backend, q, k, v, use, ref)
                times = time_fn(attention_fn(backend, q, k, v, use), device, args.warmup, args.iters)
        except RuntimeError as err:
            row.update(status="unsupported", reason=str(err).splitlines()[0][:200])
            rows.append(row)
            continue
        seconds = median(times)
        row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, status="ok")
        rows.append(row)
    eager = next((r for r in rows if r["backend"] == "eager" and r["status"] == "ok"), None)
    for row in rows:
        if eager and row["status"] == "ok":
            row["speedup"] = eager["ms"] / row["ms"]
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, small CPU batch")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    import torch  # after parsing: --help answers without torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")
    ]
    args.batch = args.batch or (32 if gpu else 4)
    args.iters = args.iters or (5 if args.quick else (50 if gpu else 10))
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10 if gpu else 3)
    rows = []
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(device=str(device), flops_model="fwd+bwd = 3 x 4*B*H*S^2*D")
    for shape in args.shapes:
        for masked in (True, False):
            rows += bench_case(shape, args.batch, masked, args, device, dtype)
            write_results("bench_attention", rows, config, args.out, COLUMNS, partial=True)
    write_results("bench_attention", rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
