"""Validation: ITM / MLM accuracy on held-out shards, and a small image<->text R@1 probe
that scores every (image, caption) pair with the ITM head."""

from __future__ import annotations

import contextlib

import torch

from pixelbert_dist.metrics import MetricSums
from pixelbert_dist.train.recall import recall_at_k


def batch_metrics(out: dict, batch: dict) -> dict:
    """Sums and counts (not means) so windows and ranks combine exactly: sums as tensors on
    the device (nothing waits for them here), the counts the host knows as ints."""
    itm_right = (out["itm_logits"].argmax(-1) == batch["itm_labels"]).sum()
    mlm_right = (out["mlm_logits"].argmax(-1) == out["mlm_targets"]).sum()
    n, m = batch["itm_labels"].numel(), out["mlm_targets"].numel()
    return {
        "loss": out["loss"].detach() * n,
        "mlm_loss": out["mlm_loss"].detach() * m,
        "itm_loss": out["itm_loss"].detach() * n,
        "itm_right": itm_right,
        "mlm_right": mlm_right,
        "n": n,
        "m": m,
    }


def metric_values(totals: dict[str, float]) -> dict[str, float]:
    """Means and accuracies from the sums of ``batch_metrics`` (over every rank)."""
    n, m = max(totals["n"], 1), max(totals["m"], 1)
    return {
        "loss": totals["loss"] / n,
        "mlm_loss": totals["mlm_loss"] / m,
        "itm_loss": totals["itm_loss"] / n,
        "itm_acc": totals["itm_right"] / n,
        "mlm_acc": totals["mlm_right"] / m,
    }


def reduce_metrics(sums: MetricSums) -> dict[str, float]:
    return metric_values(sums.reduce())


def gathered_params(engine):
    """ZeRO-3 keeps each rank's slice of the weights: gather them for direct sub-module calls."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def itm_score_matrix(model, probe: dict) -> torch.Tensor:
    """scores[i, j] = the ITM margin of image i with caption j; the CNN runs once per image."""
    pixels, mask = model.encode_pixels(probe["images"], probe["image_sizes"])
    text = {k: probe[k] for k in ("input_ids", "attention_mask")}
    n = pixels.shape[0]
    rows = []
    for i in range(n):
        rows.append(model.itm_score(text, pixels[i : i + 1].expand(n, -1, -1), mask[i : i + 1].expand(n, -1)))
    return torch.stack(rows).float().cpu()


@torch.no_grad()
def evaluate(engine, val_loader, probe_loader, to_device, max_batches: int = 0) -> dict:
    """Sums over every rank's share of the validation split (is_pad repeats excluded)."""
    engine.eval()
    sums = MetricSums()
    for k, batch in enumerate(val_loader):
        if max_batches and k >= max_batches:
            break
        keep = ~batch["is_pad"]
        out = engine(to_device(batch))
        rows_of_masked = (batch["mlm_labels"] != -100).nonzero()[:, 0]
        masked_keep = keep[rows_of_masked].to(out["mlm_targets"].device)
        # losses are batch means (repeats included); accuracies count kept rows only
        kept = dict(
            out,
            itm_logits=out["itm_logits"][keep.to(out["itm_logits"].device)],
            mlm_logits=out["mlm_logits"][masked_keep],
            mlm_targets=out["mlm_targets"][masked_keep],
        )
        labels = {"itm_labels": batch["itm_labels"][keep].to(kept["itm_logits"].device)}
        sums.add(batch_metrics(kept, labels))
    values = reduce_metrics(sums) if sums else {}
    if probe_loader is not None:
        probe = to_device(next(iter(probe_loader)))
        with gathered_params(engine):
            scores = itm_score_matrix(engine.module, probe)
        recall = recall_at_k(scores, torch.arange(scores.shape[1]), ks=(1,))
        values.update({"i2t_r1": recall["i2t_r1"], "t2i_r1": recall["t2i_r1"]})
    engine.train()
    return values
