"""How the model runs: evaluation independent of the batch, bf16 on CPU as DeepSpeed runs
it, activation checkpointing that changes nothing but memory."""

import copy

import pytest
import torch

from pixelbert_dist.model import build_model


def tiny_with_stats(**overrides):
    """The tiny preset (trainable BatchNorm) with non-trivial running statistics."""
    torch.manual_seed(0)
    model = build_model("tiny", **overrides)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def text(rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (rows, 9), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = text(4, seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2:5] = batch["input_ids"][:, 2:5]
    return {
        **batch,
        "images": torch.randn(4, 3, 128, 192, generator=gen),
        "image_sizes": torch.tensor([[128, 192], [100, 150], [64, 64], [120, 70]]),
        "mlm_labels": labels,
        "itm_labels": torch.tensor([1, 0, 1, 0]),
    }


@pytest.mark.parametrize("small_size", [(64, 128), (50, 100)])
def test_eval_outputs_of_an_image_do_not_depend_on_its_batch(small_size):
    """A 64x128 image (or a 50x100 one, which the loader pads to 64x128) gives the same
    pixel tokens and ITM score alone and padded to 128x128 beside a bigger image."""
    model = tiny_with_stats().eval()
    gen = torch.Generator().manual_seed(1)
    alone = torch.zeros(1, 3, 64, 128)
    alone[0, :, : small_size[0], : small_size[1]] = torch.randn(3, *small_size, generator=gen)
    batched = torch.zeros(2, 3, 128, 128)
    batched[0, :, :64, :128] = alone[0]
    batched[1] = torch.randn(3, 128, 128, generator=gen)
    sizes = torch.tensor([small_size, (128, 128)])
    captions = text(2)
    with torch.no_grad():
        tokens_alone, mask_alone = model.encode_pixels(alone, sizes[:1])
        tokens_batch, mask_batch = model.encode_pixels(batched, sizes)
        torch.testing.assert_close(tokens_batch[0][mask_batch[0]], tokens_alone[0][mask_alone[0]], atol=1e-5, rtol=1e-5)
        score_alone = model.itm_score({k: v[:1] for k, v in captions.items()}, tokens_alone, mask_alone)
        score_batch = model.itm_score(captions, tokens_batch, mask_batch)
        torch.testing.assert_close(score_batch[:1], score_alone, atol=1e-5, rtol=1e-5)
        logits_alone = model({**{k: v[:1] for k, v in captions.items()}, "images": alone, "image_sizes": sizes[:1]})[
            "itm_logits"
        ]
        logits_batch = model({**captions, "images": batched, "image_sizes": sizes})["itm_logits"]
        torch.testing.assert_close(logits_batch[:1], logits_alone, atol=1e-5, rtol=1e-5)
        # the big image is unchanged by the grouping too
        tokens_big, _ = model.encode_pixels(batched[1:], sizes[1:])
        torch.testing.assert_close(tokens_batch[1], tokens_big[0], atol=1e-5, rtol=1e-5)


def test_tiny_trains_in_bf16_on_cpu_like_deepspeed():
    """DeepSpeed's bf16 casts parameters, not buffers (BatchNorm statistics stay fp32), and
    the Trainer casts float inputs to bf16: forward + backward run, and agree with fp32."""
    reference = tiny_with_stats().train()
    model = copy.deepcopy(reference)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    batch = train_batch()
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    outputs = []
    for net, inputs in ((reference, batch), (model, low)):
        torch.manual_seed(3)  # same dropout and pixel samples
        out = net(inputs)
        out["loss"].backward()
        outputs.append(out)
    assert outputs[1]["hidden_states"].dtype == torch.bfloat16
    assert torch.isfinite(outputs[1]["loss"])
    torch.testing.assert_close(outputs[1]["loss"], outputs[0]["loss"], atol=0.05, rtol=0.02)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad).all(), name
    bn, bn_ref = model.visual.backbone.bn1, reference.visual.backbone.bn1
    assert bn.running_mean.dtype == torch.float32
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=0.02, rtol=0.02)


def forward_calls(model, batch) -> dict[str, int]:
    """How often an encoder layer, the first residual block of layer3 and the CNN stem run
    in one training step: twice where checkpointing recomputes them in backward."""
    parts = {
        "encoder": model.encoder.layer[0],
        "cnn_block": model.visual.backbone.layer3[0],
        "cnn_stem": model.visual.backbone.conv1,
    }
    calls = dict.fromkeys(parts, 0)
    handles = [
        module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, module in parts.items()
    ]
    model(batch)["loss"].backward()
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize(
    "mode, trunk",
    [
        ("transformer", {}),
        ("all", {}),
        ("all", {"backbone": "resnet18"}),  # two blocks a stage: nested checkpoints
        ("all", {"backbone": "resnet18", "freeze_bn": True}),  # r50's frozen BatchNorm
    ],
)
def test_activation_checkpointing_changes_memory_not_results(mode, trunk):
    """Dropout, pixel sampling and training-mode BatchNorm all on: the same loss (bit for
    bit), the same gradients and the same BatchNorm statistics (updated once, not again on
    recompute, also when a stage and then each of its blocks are recomputed)."""
    off = tiny_with_stats(**trunk).train()
    on = build_model("tiny", activation_checkpointing=mode, **trunk).train()
    on.load_state_dict(off.state_dict())
    batch = train_batch()
    losses = []
    for model in (off, on):
        torch.manual_seed(7)
        out = model(batch)
        out["loss"].backward()
        losses.append(out["loss"])
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0)
    grads = dict(on.named_parameters())
    for name, param in off.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, atol=1e-7, rtol=1e-6, msg=name)
    buffers = dict(on.named_buffers())
    for name, buffer in off.named_buffers():
        assert torch.equal(buffers[name], buffer), name


@pytest.mark.parametrize("backbone", ["resnet10", "resnet18"])  # resnet18: nested checkpoints
def test_sync_batchnorm_keeps_the_recompute_guard(backbone):
    """train.sync_bn's SyncBatchNorm under full activation checkpointing: the same loss,
    gradients and running statistics as plain BatchNorm without checkpointing (one update
    per step, not a second one when backward recomputes a stage). torch's own
    convert_sync_batchnorm fails this: its module updates them on the recomputation too."""
    from pixelbert_dist.model.visual import BatchNorm, SyncBatchNorm, sync_batchnorms

    off = tiny_with_stats(backbone=backbone).train()
    on = build_model("tiny", backbone=backbone, activation_checkpointing="all").train()
    on.load_state_dict(off.state_dict())
    on = sync_batchnorms(on)
    assert any(isinstance(m, SyncBatchNorm) for m in on.modules())
    assert not any(isinstance(m, BatchNorm) for m in on.modules())
    batch = train_batch()
    losses = []
    for model in (off, on):
        torch.manual_seed(7)
        out = model(batch)
        out["loss"].backward()
        losses.append(out["loss"])
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0)
    grads = dict(on.named_parameters())
    for name, param in off.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, atol=1e-7, rtol=1e-6, msg=name)
    buffers = dict(on.named_buffers())
    for name, buffer in off.named_buffers():
        assert torch.equal(buffers[name], buffer), name


def test_activation_checkpointing_recomputes_what_it_says():
    on = build_model("tiny").train()
    batch = train_batch()
    # tiny: one block a stage, whose recomputation within its stage's stops before it runs
    # (torch's non-reentrant checkpoint stops once the inputs it must give back are there)
    recomputed = {"none": (1, 1, 1), "transformer": (2, 1, 1), "all": (2, 2, 2)}
    for setting, calls in recomputed.items():
        on.set_activation_checkpointing(setting)
        assert tuple(forward_calls(on, batch).values()) == calls, setting
    # two blocks a stage: the first runs in the forward, again when the backward recomputes
    # its stage (to rebuild the second block's input) and again for its own backward
    deeper = build_model("tiny", backbone="resnet18", activation_checkpointing="all").train()
    assert tuple(forward_calls(deeper, batch).values()) == (2, 3, 2)
    on.eval()  # never in evaluation, even with gradients on; the CNN runs once per size group
    assert tuple(forward_calls(on, batch).values()) == (1, 3, 3)  # 128x192 (two images), 64x64, 128x128


def test_activation_checkpointing_setting_is_checked():
    assert build_model("tiny", activation_checkpointing=True).config.activation_checkpointing == "transformer"
    with pytest.raises(ValueError, match="activation_checkpointing='cnn'.*none.*transformer.*all"):
        build_model("tiny", activation_checkpointing="cnn")


def test_train_activation_checkpointing_reaches_every_pixelbert():
    """`train.activation_checkpointing=all` sets the model's mode, also inside a task model."""
    from pixelbert_dist.config import ConfigError, load_config
    from pixelbert_dist.train.config import RunConfig
    from pixelbert_dist.model.pixelbert import set_activation_checkpointing

    model = build_model("tiny")
    set_activation_checkpointing(torch.nn.Sequential(model), "all")
    assert model.config.activation_checkpointing == "all"
    assert model.encoder.checkpointing
    assert model.visual.checkpointing
    with pytest.raises(ValueError, match="holds no PixelBert"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), "all")
    assert (
        load_config(RunConfig, None, ["train.activation_checkpointing=transformer"]).train.activation_checkpointing
        == "transformer"
    )
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(RunConfig, None, ["train.activation_checkpointing=cnn"])
