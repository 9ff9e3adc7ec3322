"""The hybrid optimiser equals torch SGD + AdamW, builds the paper's groups, and shards under ZeRO."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pixelbert_dist.train.optim import HybridOptimizer, build_optimizer
from pixelbert_dist.train.config import OptimConfig

CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"


class TinyPixelModel(nn.Module):
    """A conv 'backbone' under visual.backbone.* and a small transformer-like head."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Module()
        self.visual.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.embed = nn.Embedding(10, 16)
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, images, tokens, labels):
        pixels = torch.relu(self.visual.backbone(images)).mean((2, 3))
        hidden = self.norm(self.proj(pixels) + self.embed(tokens).mean(1))
        return nn.functional.cross_entropy(self.head(hidden), labels)


def _batches(n: int, batch: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 8, 8, generator=gen),
            torch.randint(0, 10, (batch, 5), generator=gen),
            torch.randint(0, 4, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


def _groups_by_name(model: nn.Module, cfg: OptimConfig) -> dict:
    return {g["name"]: g for g in build_optimizer(model, cfg).param_groups}


def test_groups_follow_the_paper():
    model = TinyPixelModel()
    model.embed.weight.requires_grad_(False)  # frozen params are left out
    groups = _groups_by_name(model, OptimConfig())
    names = {n for g in groups.values() for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert "embed.weight" not in names
    cnn, decay, no_decay = groups["cnn"], groups["transformer_decay"], groups["transformer_no_decay"]
    assert (cnn["rule"], cnn["lr"], cnn["momentum"], cnn["weight_decay"]) == ("sgd", 1e-2, 0.9, 5e-4)
    assert len(cnn["params"]) == 4  # conv weight+bias, BatchNorm weight+bias
    assert (decay["rule"], decay["lr"], decay["weight_decay"]) == ("adamw", 1e-4, 1e-2)
    assert {tuple(p.shape) for p in decay["params"]} == {(16, 8), (4, 16)}
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 4  # proj.bias, norm.weight, norm.bias, head.bias


def test_cnn_rule_adamw_for_a_cnn_trained_from_scratch():
    cnn = _groups_by_name(TinyPixelModel(), OptimConfig(cnn_rule="adamw", cnn_lr=3e-3))["cnn"]
    assert (cnn["rule"], cnn["lr"], cnn["weight_decay"], cnn["betas"]) == ("adamw", 3e-3, 5e-4, (0.9, 0.999))
    with pytest.raises(ValueError, match="optim.cnn_rule='lamb'"):
        build_optimizer(TinyPixelModel(), OptimConfig(cnn_rule="lamb"))


def test_refuses_empty_model_and_bad_groups():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig())
    with pytest.raises(ValueError, match="'rule' must be one of"):
        HybridOptimizer([{"params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match=r"param group 0 \(cnn\): lr must be >= 0"):
        HybridOptimizer([{"params": [nn.Parameter(torch.zeros(2))], "rule": "sgd", "lr": -1.0, "name": "cnn"}])
    with pytest.raises(ValueError, match="betas must lie in"):
        build_optimizer(TinyPixelModel(), OptimConfig(betas=(0.9, 1.5)))
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        HybridOptimizer([{"params": [nn.Parameter(torch.zeros(2))], "rule": "sgd", "nesterov": True}])


def _reference_optimizers(model: nn.Module, ref_model: nn.Module, hybrid: HybridOptimizer) -> list:
    """torch.optim.SGD / AdamW over ref_model's copies of each hybrid group's params."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    out = []
    for g in hybrid.param_groups:
        ps = [ref_params[name_of[id(p)]] for p in g["params"]]
        if g["rule"] == "sgd":
            out.append(
                torch.optim.SGD(ps, lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"], foreach=False)
            )
        else:
            out.append(
                torch.optim.AdamW(
                    ps, lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"], foreach=False
                )
            )
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_steps_equal_torch_sgd_plus_adamw(fused):
    torch.manual_seed(0)
    model = TinyPixelModel()
    ref_model = copy.deepcopy(model)
    hybrid = build_optimizer(model, OptimConfig(fused=fused))
    refs = _reference_optimizers(model, ref_model, hybrid)
    for images, tokens, labels in _batches(6):
        for m, opts in ((model, [hybrid]), (ref_model, refs)):
            for o in opts:
                o.zero_grad()
            m(images, tokens, labels).backward()
            for o in opts:
                o.step()
    # the same kernels: bit-equal for the foreach path, fused AdamW to float rounding
    atol = 1e-6 if fused else 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=f"{name} differs")
    sgd_state = hybrid.state[model.visual.backbone[0].weight]
    assert set(sgd_state) == {"momentum_buffer"}
    assert set(hybrid.state[model.head.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(hybrid.state[model.head.weight]["step"]) == 6.0


def test_fused_falls_back_with_a_warning_where_unsupported(monkeypatch):
    import pixelbert_dist.train.optim as optim

    torch.manual_seed(0)
    model = TinyPixelModel()
    twin = copy.deepcopy(model)
    # play a torch build with fused kernels on CUDA only (this one has them on CPU, too)
    monkeypatch.setattr(optim, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    fused = build_optimizer(model, OptimConfig(fused=True))
    plain = build_optimizer(twin, OptimConfig(fused=False))
    images, tokens, labels = _batches(1)[0]
    for m in (model, twin):
        m(images, tokens, labels).backward()
    with pytest.warns(UserWarning, match=r"fused AdamW is not available for params on \['cpu'\]"):
        fused.step()
    plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert build_optimizer(model, OptimConfig())._use_fused(list(model.parameters())) is False


def test_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyPixelModel()
    opt = build_optimizer(model, OptimConfig())
    images, tokens, labels = _batches(1)[0]
    model(images, tokens, labels).backward()
    opt.step()
    clone = build_optimizer(copy.deepcopy(model), OptimConfig(lr=5.0))
    clone.load_state_dict(opt.state_dict())
    assert [g["rule"] for g in clone.param_groups] == ["sgd", "adamw", "adamw"]
    assert clone.param_groups[1]["lr"] == 1e-4


def _run_engine(stage: int, steps: int = 4) -> tuple[list[float], list[tuple]]:
    import deepspeed

    from pixelbert_dist.distributed.ds_config import fill_deepspeed_config

    torch.manual_seed(0)
    model = TinyPixelModel()
    opt = build_optimizer(model, OptimConfig())
    ds = fill_deepspeed_config(
        CONFIGS / f"zero{stage}.json", micro_batch=4, grad_accum=1, world_size=1, grad_clip=0.0, precision=None
    )
    ds["bf16"]["enabled"] = False  # fp32: the stages must agree to rounding
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    losses = []
    for images, tokens, labels in _batches(steps):
        loss = engine(images, tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    groups = [(g["name"], g["rule"], g["lr"], g["weight_decay"]) for g in opt.param_groups]
    return losses, groups


@pytest.mark.slow
def test_zero_stages_follow_zero0(dist_env):
    ref_losses, ref_groups = _run_engine(0)
    assert ref_losses[-1] < ref_losses[0]
    for stage in (1, 2, 3):
        losses, groups = _run_engine(stage)
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"ZeRO-{stage}"
        assert groups == ref_groups  # ZeRO kept each group's rule, lr and decay


# ---- schedules -------------------------------------------------------------------

from pixelbert_dist.train.schedule import LrFactor, build_scheduler, clamp_warmup  # noqa: E402
from pixelbert_dist.train.config import ScheduleConfig  # noqa: E402


def _lrs(kind: str, steps: int, **kw) -> list[list[float]]:
    model = TinyPixelModel()
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, ScheduleConfig(kind=kind, **kw), steps_per_epoch=10, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_warmup_then_step_decay_at_milestones():
    lrs = _lrs("step", 40, warmup_steps=4, milestones_epochs=[2, 3])
    cnn = [row[0] for row in lrs]
    assert cnn[:5] == pytest.approx([0.25e-2, 0.5e-2, 0.75e-2, 1e-2, 1e-2])
    assert cnn[19] == pytest.approx(1e-2)
    assert cnn[20] == pytest.approx(1e-3)  # epoch 2 = step 20
    assert cnn[29] == pytest.approx(1e-3)
    assert cnn[30] == pytest.approx(1e-4)  # epoch 3 = step 30
    # every group gets the same factor of its own base lr (CNN 1e-2, transformer 1e-4)
    for row in lrs:
        assert row[1] == pytest.approx(row[0] / 100)
        assert row[2] == row[1]


def test_cosine_end_value_and_constant():
    lrs = _lrs("cosine", 21, warmup_steps=1, min_lr_ratio=0.1)
    transformer = [row[1] for row in lrs]
    assert transformer[1] == pytest.approx(1e-4)
    assert transformer[11] == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))  # half-way down
    factor = LrFactor(ScheduleConfig(kind="cosine", warmup_steps=1, min_lr_ratio=0.1), 10, 21)
    assert factor(21) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(transformer[1:], transformer[2:]))  # never rises
    assert {row[0] for row in _lrs("constant", 5)} == {1e-2}


def test_schedule_state_round_trips_and_bad_config():
    model = TinyPixelModel()
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=3), 10, 100)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 5
    assert state["lr_lambdas"] == [None, None, None]  # numbers only
    opt2 = build_optimizer(copy.deepcopy(model), OptimConfig())
    sched2 = build_scheduler(opt2, ScheduleConfig(warmup_steps=3), 10, 100)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="schedule.kind must be one of"):
        build_scheduler(opt, ScheduleConfig(kind="linear"), 10, 100)
    # issue 14.2: warm-up longer than the run is clamped to the run (it used to be refused)
    clamped, note = clamp_warmup(ScheduleConfig(kind="cosine", warmup_steps=150), 100)
    assert clamped.warmup_steps == 100
    assert "clamped to 100 steps" in note
    assert clamp_warmup(ScheduleConfig(warmup_steps=100), 100) == (ScheduleConfig(warmup_steps=100), None)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        build_scheduler(opt, ScheduleConfig(warmup_steps=-1), 10, 100)
