"""Turn a results folder's JSON into ``summary.md`` and PNG plots.

    python -m benchmarks.summarize benchmarks/results/<machine>-<date>/

Reads every ``*.json`` written by the benchmarks (``{"machine", "config", "rows"}``), writes
one markdown file with the hardware, torch version and commit, a table per benchmark and
the plots: attention TFLOP/s per backend, training samples/s and MFU per config, and the
scaling efficiency curve (bench_scaling draws that one itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import markdown_table

ORDER = ["bench_data", "bench_attention", "bench_step", "bench_compile", "bench_memory", "bench_comms", "bench_scaling"]
# What each benchmark compares against and its target, for the ones whose JSON does not say.
STANDARDS = {
    "bench_data": (
        "the other backends in the table (PIL DataLoader, DALI CPU/GPU, nvjpeg) at the same sizes",
        "none: a throughput table (decode must outpace the training step, see bench_step's data wait)",
    ),
    "bench_attention": (
        "eager attention (matmul + softmax) at the same shape and dtype",
        "fused SDPA >= 2x eager at pre-training shapes on an H100/H200",
    ),
    "bench_step": (
        "the GPU's dense peak (MFU); steps are medians of the timed steps",
        "pixelbert-r50 bf16 >= 40% MFU on an H100/H200 (no peak on a CPU: no verdict)",
    ),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(rows: list[dict], path: Path) -> Path | None:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    plt = _plt()
    seq = {r["shape"]: r["seq"] for r in ok}
    cases = sorted({(r["shape"], r["mask"]) for r in ok}, key=lambda c: (seq[c[0]], c[1] != "padded"))
    backends = [b for b in ["eager", "math", "flash", "mem_efficient", "cudnn"] if any(r["backend"] == b for r in ok)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [
            next((r["tflops"] for r in ok if (r["shape"], r["mask"]) == c and r["backend"] == backend), 0)
            for c in cases
        ]
        ax.bar([j + i * width for j in range(len(cases))], values, width, label=backend)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{m}" for s, m in cases], fontsize=7)
    ax.set_ylabel("TFLOP/s (fwd+bwd)")
    ax.set_title(f"attention, {ok[0]['dtype']}, batch {ok[0]['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_step(rows: list[dict], path: Path) -> Path | None:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    plt = _plt()
    labels = [f"{r['preset']}\nZ{r['zero']} {r['precision']} mb{r['micro_batch']} px:{r['sampling']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, len(ok) * 1.1), 4))
    ax.bar(range(len(ok)), [r["samples_per_s"] for r in ok], color="tab:blue")
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("samples/s")
    if any(r.get("mfu") for r in ok):
        twin = ax.twinx()
        twin.plot(range(len(ok)), [r.get("mfu") or 0 for r in ok], "o", color="tab:red")
        twin.set_ylabel("MFU", color="tab:red")
        twin.set_ylim(0, 1)
    ax.set_title("training step (DeepSpeed engine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _section(name: str, data: dict, folder: Path) -> list[str]:
    rows = data.get("rows", [])
    columns = data.get("columns") or sorted({k for r in rows for k in r})
    lines = [f"## {name}", ""]
    config = data.get("config") or {k: v for k, v in data.items() if k not in ("rows", "machine")}
    kind = data.get("bench", name)  # several files of one benchmark (bench_comms_r50.json)
    baseline, target = STANDARDS.get(kind, (None, None))
    lines += [
        f"- Compared against: {config.get('baseline') or baseline or '(not stated)'}",
        f"- Target: {config.get('target') or target or '(none)'}",
        f"- Verdict: {verdict_of(kind, rows)}",
        "",
    ]
    if config:
        shown = {k: v for k, v in config.items() if k != "model"}
        lines += ["Config: `" + json.dumps(shown, default=str) + "`", ""]
    if config.get("model"):
        lines += ["Model:", "", "```", config["model"], "```", ""]
    if kind == "bench_scaling" and rows:  # the full grid is in the JSON and the plot
        top = max(r["nodes"] for r in rows)
        lines += [f"Rows at {top} nodes (every node count: {name}.json, {name}.png):", ""]
        rows = [r for r in rows if r["nodes"] == top]
    lines += [markdown_table(rows, columns), ""]
    plotters = {"bench_attention": plot_attention, "bench_step": plot_step}
    png = folder / f"{name}.png"
    if name in plotters:
        png = plotters[name](rows, png) or png
    if png.is_file():
        lines += [f"![{name}]({png.name})", ""]
    return lines


def verdict_of(name: str, rows: list[dict]) -> str:
    """One line: is the benchmark's target met by these rows?"""
    if name == "bench_attention":
        return "; ".join(_attention_lines(rows)) or "no rows"
    if name == "bench_step":
        mfus = [r["mfu"] for r in rows if r.get("status") == "ok" and r.get("mfu") is not None]
        if not mfus:
            return "no MFU (no GPU peak on this machine)"
        return f"best MFU {max(mfus):.1%}: {_mark(max(mfus) >= TARGET_MFU)} target {TARGET_MFU:.0%}"
    if name == "bench_comms":
        totals = [r for r in rows if r.get("op") == "TOTAL"]
        worst = max(abs(r["error"]) for r in totals) if totals else None
        return (
            "no TOTAL rows"
            if worst is None
            else f"worst |predicted - measured| / measured over {len(totals)} configs: "
            f"{worst:.2%} ({_mark(worst <= 0.05)} 5%)"
        )
    if name == "bench_scaling":
        top = max(r["nodes"] for r in rows)
        ok = sorted(
            {f"mb{r['micro_batch']} {r['setting']}" for r in rows if r["nodes"] == top and r["efficiency"] >= 0.9}
        )
        return f"{len(ok)} setting(s) at >= 90% on {top} nodes" + (f": {'; '.join(ok)}" if ok else "")
    if name == "bench_memory":
        # live tensor bytes (allocator) where measured; older results: resident set size
        key = "peak_saving_vs_none" if any("peak_saving_vs_none" in r for r in rows) else "saving_vs_none"
        saved = [f"{r['mode']}: peak {r[key]:.0%} below none ({r.get('verdict', '-')})" for r in rows if key in r]
        missing = "" if any(r["mode"] == "all" for r in rows) else "; mode 'all' not measured: no verdict"
        return ("; ".join(saved) or "no mode to compare with none") + missing
    if name == "bench_compile":
        shown = [  # a partial row (time limit) has no speedup
            f"{r['preset']}: {r['speedup']:.2f}x, {r['verdict']}" if "speedup" in r else r["verdict"] for r in rows
        ]
        return "; ".join(shown) or "no rows"
    return "no target"


def summarize(folder: Path) -> Path:
    files = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    if not files:
        raise SystemExit(f"{folder}: no benchmark JSON to summarise")
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    machine = next(iter(files.values())).get("machine", {})
    lines = [f"# Benchmarks: {folder.name}", "", "| machine | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines.append("")
    for name in names:
        lines += _section(name, files[name], folder)
    path = folder / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


TARGET_MFU, TARGET_SPEEDUP = 0.40, 2.0  # the targets on one H100


def _mark(ok: bool) -> str:
    return "MEETS" if ok else "BELOW"


def _attention_lines(rows: list[dict]) -> list[str]:
    lines = []
    for mask in ("padded", "none"):
        case = [r for r in rows if r.get("status") == "ok" and r["mask"] == mask and r["shape"].startswith("pretrain")]
        eager = next((r for r in case if r["backend"] == "eager"), None)
        fused = [r for r in case if r["backend"] not in ("eager", "math")]
        if not eager or not fused:
            lines.append(f"attention pretrain ({mask} mask): no fused backend ran")
            continue
        best = max(fused, key=lambda r: r["speedup"])
        lines.append(
            f"attention pretrain seq {best['seq']} ({mask} mask, {best['dtype']}): "
            f"{best['backend']} {best['speedup']:.2f}x eager, {best['tflops']:.1f} TFLOP/s "
            f"[{_mark(best['speedup'] >= TARGET_SPEEDUP)} target {TARGET_SPEEDUP:.0f}x]"
        )
    return lines


def _step_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"step {r['preset']} mb{r['micro_batch']} px:{r['sampling']}: {r.get('status')}")
            continue
        mfu = r.get("mfu")
        verdict = f" [{_mark(mfu >= TARGET_MFU)} target {TARGET_MFU:.0%}]" if mfu is not None else ""
        lines.append(
            f"step {r['preset']} ZeRO-{r['zero']} {r['precision']} mb{r['micro_batch']} "
            f"{r['image']} px:{r['sampling']}: {r['samples_per_s']:.1f} samples/s, "
            f"{r['tflops_per_gpu']:.1f} TFLOP/s, MFU {'-' if mfu is None else f'{mfu:.1%}'}, "
            f"{r['peak_mem_gib']:.1f} GiB, data wait {r['data_wait']:.1%}{verdict}"
        )
    return lines


def _preflight_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    failed = [f"{r['check']}: {r['detail']}" for r in rows if not r["ok"]]
    seconds = sum(r["seconds"] for r in rows)
    return [f"preflight: {len(rows) - len(failed)}/{len(rows)} checks ok in {seconds:.1f} s"] + [
        f"preflight FAILED {line}" for line in failed
    ]


def _compile_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        head = f"compile {r['preset']} {r['precision']} mb{r['micro_batch']}: "
        if "speedup" not in r:  # the step's time limit came first: how far it got
            compiled = f", first compiled step {r['compile_s']:.0f} s" if "compile_s" in r else ""
            lines.append(head + f"stopped while {r['verdict']}: eager {r['eager_ms']:.1f} ms{compiled}")
            continue
        lines.append(
            head + f"{r['speedup']:.2f}x eager ({r['compiled_ms']:.1f} vs {r['eager_ms']:.1f} ms, "
            f"compile {r['compile_s']:.0f} s): {r['verdict']}"
        )
    return lines


def brief(folder: Path) -> str:
    """One screen: the figures the GPU check exists for, against the targets."""
    files = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    machine = next(iter(files.values()), {}).get("machine", {})
    lines = [
        f"GPU check: {machine.get('gpu') or 'no GPU'} | torch {machine.get('torch')} | commit {machine.get('commit')}"
    ]
    lines += _preflight_lines(files.get("preflight", {}).get("rows", []))
    for r in files.get("bench_pretrain", {}).get("rows", []):
        where = f" ZeRO-{r['zero']} {r['precision']}" if "zero" in r else ""
        lines.append(f"pretrain {r['phase']}{where}: {r['verdict']}: {r['check']}")
    partial = sorted(name for name, data in files.items() if data.get("partial"))
    if partial:
        lines.append(f"stopped before their last row (time limit?): {partial}")
    if "bench_attention" in files:
        lines += _attention_lines(files["bench_attention"]["rows"])
    if "bench_step" in files:
        lines += _step_lines(files["bench_step"]["rows"])
    for r in files.get("bench_memory", {}).get("rows", []):
        lines.append(
            f"memory {r['preset']} {r['image']} mb{r['micro_batch']} checkpointing {r['mode']}: "
            + (f"peak tensors {r['peak_gib']:.2f} GiB, " if "peak_gib" in r else "")
            + (f"{r['peak_saving_vs_none']:.0%} below none, " if "peak_saving_vs_none" in r else "")
            + f"peak RSS {r['peak_rss_gib']:.2f} GiB, step {r['step_s']:.3f} s"
        )
    lines += _compile_lines(files.get("bench_compile", {}).get("rows", []))
    overhead = [r for name, data in files.items() if name.startswith("bench_step_overhead") for r in data["rows"]]
    for r in overhead:
        lines.append(
            f"overhead {r['preset']} {r['image']} mb{r['micro_batch']}: trainer {r['overhead']:+.1%} vs bare loop "
            f"(target <= 3%), outside the engine {r['framework_ms']:+.2f} ms/step; host syncs per optimizer step: "
            f"trainer {r.get('trainer_syncs', float('nan')):.2f}, bare {r.get('bare_syncs', float('nan')):.2f}"
        )
    for r in files.get("bench_decode", {}).get("rows", []):
        lines.append(f"decode {r['label']} {r['size']} {r['shorter']}/{r['max']}: {r['images_per_s']:.0f} img/s")
    expected = ("preflight", "bench_pretrain", "bench_attention", "bench_step", "bench_decode")
    missing = [n for n in expected if n not in files]
    if missing:
        lines.append(f"missing results: {missing} (see gpu_check.log and logs/)")
    text = "\n".join(lines) + "\n"
    (folder / "brief.txt").write_text(text)
    return text


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--brief", action="store_true", help="also write/print brief.txt")
    args = parser.parse_args(argv)
    path = summarize(args.folder)
    print(f"wrote {path}")
    if args.brief:
        print(brief(args.folder), end="")
    return path


if __name__ == "__main__":
    main()
