"""One optimiser, two update rules: SGD-momentum for the CNN, AdamW for the transformer.

Pixel-BERT trains its CNN with SGD (lr 1e-2, wd 5e-4) and its transformer with AdamW
(lr 1e-4, wd 1e-2). DeepSpeed ZeRO takes exactly one ``torch.optim.Optimizer``: it
flattens each param group into one fp32 partition, puts that flat tensor into the
group's ``params`` and keeps every other key of the group. So the rule lives in the
group (``group["rule"]``), and ``step`` dispatches each group to the functional
kernels that ``torch.optim.SGD`` / ``torch.optim.AdamW`` themselves call — the update is
the same arithmetic, state names included (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``step``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch.optim.adam import adam as _adam_functional
from torch.optim.sgd import sgd as _sgd_functional
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from pixelbert_dist.train.config import OptimConfig

RULES = ("sgd", "adamw")
_SGD_DEFAULTS = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)
_ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _check_group(group: dict, index: int) -> None:
    rule = group.get("rule")
    where = f"param group {index} ({group.get('name', 'unnamed')})"
    if rule not in RULES:
        raise ValueError(f"{where}: 'rule' must be one of {RULES}, got {rule!r}")
    if not group["lr"] >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
    if rule == "sgd":
        if not group["momentum"] >= 0.0:
            raise ValueError(f"{where}: momentum must be >= 0, got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening = 0")
    else:
        beta1, beta2 = group["betas"]
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"{where}: betas must lie in [0, 1), got {group['betas']}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"{where}: eps must be >= 0, got {group['eps']}")


class HybridOptimizer(torch.optim.Optimizer):
    """Each param group names its rule: ``{"rule": "sgd", ...}`` or ``{"rule": "adamw", ...}``.

    ``fused``: True asks for the fused AdamW kernel (falls back to ``foreach`` with a
    warning on a device torch has no fused kernel for), False never, None where the
    group's params are on CUDA.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, fused: bool | None = None):
        defaults = {**_SGD_DEFAULTS, **_ADAMW_DEFAULTS, "lr": lr, "rule": None, "maximize": False}
        super().__init__(params, defaults)
        self.fused = fused
        self._warned_fused = False
        for index, group in enumerate(self.param_groups):
            _check_group(group, index)

    def add_param_group(self, param_group: dict) -> None:
        rule = param_group.get("rule")
        # a rule's defaults differ (SGD decays nothing unless told, AdamW decays 1e-2)
        base = _SGD_DEFAULTS if rule == "sgd" else _ADAMW_DEFAULTS
        param_group = {**base, **param_group}
        super().add_param_group(param_group)
        if hasattr(self, "fused"):  # called after __init__: validate now
            _check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def _use_fused(self, params: list[torch.Tensor]) -> bool:
        if self.fused is False or not params:
            return False
        devices = {p.device.type for p in params}
        supported = set(_get_fused_kernels_supported_devices())
        ok = devices <= supported and all(p.is_floating_point() for p in params)
        if self.fused is None:
            return ok and devices == {"cuda"}
        if not ok and not self._warned_fused:
            warnings.warn(
                f"fused AdamW is not available for params on {sorted(devices)}; "
                f"using the foreach implementation instead",
                stacklevel=3,
            )
            self._warned_fused = True
        return ok

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["rule"] == "sgd":
                self._sgd_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _sgd_group(self, group: dict) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            bufs.append(self.state[p].get("momentum_buffer"))
        if not params:
            return
        _sgd_functional(
            params,
            grads,
            bufs,
            foreach=True,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:  # the functional API creates buffers in place of None
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _adamw_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = self._use_fused(params)
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                # same layout as torch.optim.AdamW: a float32 step, on device for fused
                step_device = p.device if fused else torch.device("cpu")
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif fused and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)  # e.g. state loaded on CPU
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _adam_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else True,
            fused=fused or None,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # biases and LayerNorm/norm weights are 0-d/1-d; embeddings and matrices are not
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, cfg: OptimConfig, is_cnn: Callable[[str], bool]) -> list[dict]:
    """The three groups of the paper's recipe, empty ones dropped."""
    cnn, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (e.g. a frozen BatchNorm or a frozen backbone stage)
        if is_cnn(name):
            cnn.append(param)
        elif _no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    adamw = dict(rule="adamw", lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.cnn_rule == "sgd":
        cnn_group = dict(rule="sgd", momentum=cfg.cnn_momentum, nesterov=False, dampening=0.0)
    elif cfg.cnn_rule == "adamw":
        # SGD's step is proportional to the gradient, and a from-scratch CNN behind a
        # 0.02-initialised projection gets tiny ones: an adaptive rule moves it anyway.
        cnn_group = dict(adamw)
    else:
        raise ValueError(f"optim.cnn_rule={cfg.cnn_rule!r}: use 'sgd' or 'adamw'")
    groups = [
        dict(name="cnn", params=cnn, **dict(cnn_group, lr=cfg.cnn_lr, weight_decay=cfg.cnn_weight_decay)),
        dict(name="transformer_decay", params=decay, weight_decay=cfg.weight_decay, **adamw),
        dict(name="transformer_no_decay", params=no_decay, weight_decay=0.0, **adamw),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module,
    cfg: OptimConfig,
    is_cnn: Callable[[str], bool] = lambda n: n.startswith("visual.backbone."),
) -> HybridOptimizer:
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must be two numbers, got {cfg.betas!r}")
    groups = param_groups(model, cfg, is_cnn)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to optimise")
    return HybridOptimizer(groups, fused=cfg.fused)
