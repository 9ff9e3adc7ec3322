"""The Pixel-BERT model: presets, losses, attention backends, real BERT weights, sampling."""

import pytest
import torch
import transformers
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pixelbert_dist.model import (
    build_model,
    feature_mask,
    list_presets,
    load_bert_checkpoint,
    load_torchvision_backbone,
    preset_config,
    sample_pixels,
    training_flops_per_sample,
)


def make_batch(vocab=512, batch=4, text_len=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, text_len), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0  # text padding
    attention[3, 5:] = 0
    masked = (torch.rand(batch, text_len, generator=gen) < 0.3) & attention.bool()
    masked[:, 1] = True
    return {
        "images": torch.randn(batch, 3, 192, 256, generator=gen),
        "image_sizes": torch.tensor([[192, 256], [130, 200], [64, 64], [190, 100]] * 2)[:batch],
        "input_ids": ids * attention,
        "attention_mask": attention,
        "mlm_labels": torch.where(masked, ids, -100),
        "itm_labels": torch.arange(batch) % 2,
    }


def count(module):
    return sum(p.numel() for p in module.parameters())


def independent_count(name):
    """Torchvision trunk (no fc) + HF BertModel (with pooler) + projection + heads."""
    cfg = preset_config(name)
    trunks = {
        "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
        "resnext152_32x8d": (Bottleneck, [3, 8, 36, 3], 32, 8),
        "resnet10": (BasicBlock, [1, 1, 1, 1], 1, 64),
    }
    block, layers, groups, width = trunks[cfg.backbone]
    with torch.device("meta"):
        trunk = ResNet(block, layers, groups=groups, width_per_group=width)
        bert = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
            )
        )
    h, c = cfg.hidden_size, trunk.fc.in_features
    cnn = count(trunk) - count(trunk.fc)
    projection = c * h + h + 2 * h + h  # linear, LayerNorm, semantic vector s_v
    mlm_head = h * h + h + 2 * h + cfg.vocab_size  # transform + LN + bias (decoder tied)
    itm_head = 2 * h + 2
    return cnn + count(bert) + projection + mlm_head + itm_head


@pytest.mark.parametrize("name", list_presets())
def test_preset_parameter_count(name):
    model = build_model(name, device="meta", freeze_bn=False)
    assert model.num_parameters() == independent_count(name)
    if name == "pixelbert-r50":
        assert preset_config(name).hidden_size == 768
        assert preset_config(name).num_layers == 12


def test_presets_registry_and_overrides():
    assert {"pixelbert-r50", "pixelbert-x152", "tiny"} <= set(list_presets())
    assert build_model("tiny", num_layers=1).config.num_layers == 1
    with pytest.raises(KeyError, match="unknown model preset"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown model config"):
        preset_config("tiny", hiden_size=3)


def test_tiny_forward_backward_finite():
    torch.manual_seed(0)
    model = build_model("tiny", pixel_sample_size=5).train()
    out = model(make_batch())
    for key in ("loss", "mlm_loss", "itm_loss"):
        assert torch.isfinite(out[key]), key
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), name
    assert out["mlm_logits"].shape == (out["mlm_targets"].numel(), 512)
    assert out["hidden_states"].shape[1] == 12 + 5  # text + sampled pixels (of 3x4)
    assert model.eval()(make_batch())["hidden_states"].shape[1] == 12 + 12  # all pixels in eval


def test_sdpa_matches_eager_with_padding():
    torch.manual_seed(0)
    sdpa = build_model("tiny", attn_implementation="sdpa", pixel_sample_size=0).eval()
    eager = build_model("tiny", attn_implementation="eager", pixel_sample_size=0).eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch()
    a, b = sdpa(batch), eager(batch)
    torch.testing.assert_close(a["hidden_states"], b["hidden_states"], atol=1e-5, rtol=1e-5)
    a["loss"].backward()
    b["loss"].backward()
    ga = sdpa.encoder.layer[0].attention.self.query.weight.grad
    torch.testing.assert_close(ga, eager.encoder.layer[0].attention.self.query.weight.grad, atol=1e-5, rtol=1e-4)


def test_masked_tokens_do_not_change_valid_outputs():
    """Whatever sits at a padded position (text or pixel), valid tokens' outputs are unchanged."""
    torch.manual_seed(0)
    for impl in ("sdpa", "eager"):
        encoder = build_model("tiny", attn_implementation=impl).encoder.eval()
        x = torch.randn(2, 30, 128)
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[0, 20:] = False
        mask[1, 5:9] = False
        y = x.clone()
        y[~mask] = torch.randn(int((~mask).sum()), 128) * 10
        torch.testing.assert_close(encoder(x, mask)[mask], encoder(y, mask)[mask], atol=1e-5, rtol=1e-5)


def tiny_hf_bert(tmp_path, hidden=64, **kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=512,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        **kw,
    )
    bert = transformers.BertModel(cfg).eval()
    bert.save_pretrained(tmp_path)
    return bert


def test_text_path_matches_huggingface_bert(tmp_path):
    bert = tiny_hf_bert(tmp_path)
    model = build_model("tiny", hidden_size=64, intermediate_size=128, num_heads=4).eval()
    report = load_bert_checkpoint(model, tmp_path)
    assert report.unexpected == []
    assert report.missing == [
        "mlm_head.bias",
        "mlm_head.transform.LayerNorm.bias",
        "mlm_head.transform.LayerNorm.weight",
        "mlm_head.transform.dense.bias",
        "mlm_head.transform.dense.weight",
    ]
    batch = make_batch()
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ours = model(text)
    ref = bert(**text)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours["hidden_states"][valid], ref.last_hidden_state[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pooled"], ref.pooler_output, atol=1e-5, rtol=1e-5)
    # The MLM decoder is tied to the loaded word embeddings.
    assert model.mlm_head.decoder.weight.data_ptr() == model.embeddings.word_embeddings.weight.data_ptr()


def test_bert_bin_weights_only_and_shape_mismatch(tmp_path):
    bert = tiny_hf_bert(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    model = build_model("tiny", hidden_size=64, intermediate_size=128, num_heads=4)
    assert len(load_bert_checkpoint(model, tmp_path).loaded) > 20
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight.*shape"):
        load_bert_checkpoint(build_model("tiny"), tmp_path)  # 128 wide vs the file's 64
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_bert_checkpoint(model, tmp_path / "missing")


def test_torchvision_backbone_weights(tmp_path):
    trunk = ResNet(BasicBlock, [1, 1, 1, 1])
    torch.save(trunk.state_dict(), tmp_path / "resnet10.pth")
    model = build_model("tiny")
    report = load_torchvision_backbone(model, tmp_path / "resnet10.pth")
    assert report.missing == []
    assert report.unexpected == []
    torch.testing.assert_close(model.visual.backbone.layer4[0].conv2.weight, trunk.layer4[0].conv2.weight)
    wrong = ResNet(BasicBlock, [1, 1, 1, 1], width_per_group=64, groups=1)
    wrong.conv1 = torch.nn.Conv2d(3, 64, 3)
    torch.save(wrong.state_dict(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="conv1.weight"):
        load_torchvision_backbone(model, tmp_path / "bad.pth")


def test_pixel_sampling_valid_unique_k():
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, :7] = True  # fewer valid pixels than k
    mask[2, 10:30] = True
    gen = torch.Generator().manual_seed(0)
    index, picked = sample_pixels(mask, 10, gen)
    assert index.shape == picked.shape == (3, 10)
    for row in range(3):
        assert len(set(index[row].tolist())) == 10  # without replacement
        assert mask[row, index[row][picked[row]]].all()  # picked pixels are valid
    assert picked[0].all()
    assert picked[2].all()
    assert picked[1].sum() == 7
    assert set(index[1][picked[1]].tolist()) == set(range(7))
    # Uniform among the valid pixels: every valid pixel of image 2 gets picked about half the time.
    hits = torch.zeros(40)
    for _ in range(400):
        i, _ = sample_pixels(mask[2:], 10, gen)
        hits[i[0]] += 1
    assert hits[:10].sum() == 0
    assert hits[30:].sum() == 0
    assert (hits[10:30] / 400 - 0.5).abs().max() < 0.12


def test_feature_mask_from_image_sizes():
    mask = feature_mask(torch.tensor([[800, 1333], [64, 65]]), (13, 21)).view(2, 13, 21)
    assert mask[0].all()  # 800/64 -> 13 rows, 1333/64 -> 21 cols
    assert mask[1].sum() == 2
    assert mask[1, 0, :2].all()


@pytest.mark.slow
def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("tiny", hidden_dropout=0.0, attention_dropout=0.0).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(batch=8, seed=1)
    batch["images"], batch["image_sizes"] = batch["images"][..., :128, :128], torch.full((8, 2), 128)
    first = None
    for _ in range(40):
        out = model(batch)
        first = first or {k: out[k].item() for k in ("mlm_loss", "itm_loss")}
        out["loss"].backward()
        optim.step()
        optim.zero_grad()
    assert out["mlm_loss"].item() < 0.3 * first["mlm_loss"]
    assert out["itm_loss"].item() < 0.3 * first["itm_loss"]


@pytest.mark.slow
def test_training_flops_grow_with_pixels_as_the_transformer_predicts():
    cfg = preset_config("tiny")
    f100 = training_flops_per_sample(cfg, (1024, 1024), 40, 100)  # 16x16 feature pixels
    f200 = training_flops_per_sample(cfg, (1024, 1024), 40, 200)
    h, i, layers, s1, s2 = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, 140, 240
    # per layer and token: 4 h*h (qkv, out) + 2 h*i matmuls; attention 2 s*h per token (QK^T and PV)
    linear = 2 * (4 * h * h + 2 * h * i) * layers * (s2 - s1)
    attention = 2 * 2 * h * layers * (s2 * s2 - s1 * s1)
    projection = 2 * cfg.backbone_channels * h * 100
    expected = 3 * (linear + attention + projection)  # forward + backward (2x)
    assert abs((f200 - f100) - expected) / expected < 0.02
    r50 = training_flops_per_sample(preset_config("pixelbert-r50"))
    assert 4.5e11 < r50 < 7e11  # ~3x ResNet-50 forward at 800x1344 (~176 GFLOPs) + BERT-base


def test_frozen_bn_and_channels_last_run_in_bf16_like_deepspeed():
    """DeepSpeed's bf16 casts parameters but not buffers, and views every parameter as
    flat bytes: the CNN must stay contiguous and compute in the activations' dtype."""
    model = build_model("tiny", freeze_bn=True, channels_last=True).eval()
    for param in model.parameters():
        assert param.is_contiguous()
        param.data = param.data.to(torch.bfloat16)
        param.data.view(torch.uint8)  # what DeepSpeed's _broadcast_model does
    batch = make_batch()
    batch["images"] = batch["images"].to(torch.bfloat16)
    out = model(batch)
    assert out["hidden_states"].dtype == torch.bfloat16
    assert torch.isfinite(out["loss"])
