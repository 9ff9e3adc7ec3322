"""Weight loading loads everything it should or refuses, naming the keys: BERT checkpoints
(Hugging Face and original gamma/beta names, against transformers' own BertModel), the
torchvision CNN trunk."""

import pytest
import torch
import transformers
from torchvision.models.resnet import BasicBlock, ResNet

from pixelbert_dist.model import build_model, load_bert_checkpoint, load_torchvision_backbone
from pixelbert_dist.model.visual import trunk_forward

TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4}


def hf_config(layers=2):
    return transformers.BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def legacy_names(state: dict) -> dict:
    """The original BERT release's naming: LayerNorm.gamma / LayerNorm.beta."""
    out = {}
    for key, value in state.items():
        if ".LayerNorm." in key:
            key = key.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        out[key] = value.clone()
    return out


def save_bin(state: dict, folder):
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def text_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


def test_legacy_gamma_beta_checkpoint_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = transformers.BertForPreTraining(hf_config()).eval()
    with torch.no_grad():  # non-trivial LayerNorms: a skipped one would show
        for name, param in ref.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    state = legacy_names(ref.state_dict())
    assert sum(k.endswith(".gamma") for k in state) == 2 * 2 + 1 + 1  # 2 per layer, embeddings, MLM transform
    model = build_model("tiny", **TINY_TEXT).eval()
    report = load_bert_checkpoint(model, save_bin(state, tmp_path / "legacy"))
    assert report.missing == []
    assert report.heads_not_shipped == []
    batch = text_batch()
    ours = model(batch)
    theirs = ref(**batch, output_hidden_states=True)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours["hidden_states"][valid], theirs.hidden_states[-1][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pooled"], ref.bert.pooler(theirs.hidden_states[-1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model.mlm_head(ours["hidden_states"][valid]), theirs.prediction_logits[valid], atol=1e-4, rtol=1e-5
    )


def test_checkpoint_of_another_model_is_refused_naming_keys(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(hf_config())
    state = {k.replace("bert.", "roberta."): v for k, v in bert.state_dict().items()}
    model = build_model("tiny", **TINY_TEXT)
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"roberta.*: \d+ expected tensor\(s\) are not in the file: "
        r"\['embeddings\.LayerNorm\.bias'.*the file holds e\.g\. \['cls\.",
    ):
        load_bert_checkpoint(model, save_bin(state, tmp_path / "roberta"))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "dropped",
    [
        "bert.encoder.layer.1.output.dense.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "cls.predictions.transform.dense.weight",
    ],
)  # half an MLM head
def test_any_missing_tensor_is_refused_naming_it(tmp_path, dropped):
    torch.manual_seed(0)
    state = transformers.BertForPreTraining(hf_config()).state_dict()
    del state[dropped]
    ours = dropped.replace("bert.", "").replace("cls.predictions.", "mlm_head.")
    model = build_model("tiny", **TINY_TEXT)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"not in the file: \['{ours}'\]"):
        load_bert_checkpoint(model, save_bin(state, tmp_path / "partial"))
    assert_unchanged(model, before)


def test_heads_a_checkpoint_does_not_ship_are_listed(tmp_path):
    """BertForMaskedLM files have no pooler, BertModel files no MLM head: both load, and
    the report names the head left at its init."""
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(hf_config())
    report = load_bert_checkpoint(build_model("tiny", **TINY_TEXT), save_bin(mlm.state_dict(), tmp_path / "mlm"))
    assert report.heads_not_shipped == ["pooler"]
    assert report.missing == ["pooler.dense.bias", "pooler.dense.weight"]
    bare = transformers.BertModel(hf_config())
    report = load_bert_checkpoint(build_model("tiny", **TINY_TEXT), save_bin(bare.state_dict(), tmp_path / "bare"))
    assert report.heads_not_shipped == ["mlm_head"]
    assert "heads not in the file (fresh init): ['mlm_head']" in str(report)


def test_deeper_bert_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    state = transformers.BertModel(hf_config(layers=3)).state_dict()
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\..*no place in this model.*num_layers=2"):
        load_bert_checkpoint(build_model("tiny", **TINY_TEXT), save_bin(state, tmp_path / "deep"))


def test_cnn_file_missing_a_tensor_or_of_another_depth_is_refused(tmp_path):
    model = build_model("tiny")
    before = snapshot(model)
    state = ResNet(BasicBlock, [1, 1, 1, 1]).state_dict()
    del state["layer4.0.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth: 1 expected tensor.*\['layer4\.0\.conv2\.weight'\]"):
        load_torchvision_backbone(model, tmp_path / "partial.pth")
    torch.save(ResNet(BasicBlock, [2, 2, 2, 2]).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth: tensors \['layer1\.1\..*no place.*resnet10"):
        load_torchvision_backbone(model, tmp_path / "resnet18.pth")
    torch.save({"roberta.x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: \d+ expected tensor.*conv1\.weight"):
        load_torchvision_backbone(model, tmp_path / "other.pth")
    assert_unchanged(model, before)


def _live_torchvision_state(net: torch.nn.Module) -> dict:
    """A torchvision model's state_dict as saved from a live model: a few training-mode
    forwards give its BatchNorms running statistics and num_batches_tracked counters."""
    gen = torch.Generator().manual_seed(0)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 3, 64, 64, generator=gen))
    return net.eval().state_dict()


def _torchvision_trunk(net, images: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.slow
def test_live_torchvision_resnet50_file_loads_and_matches(tmp_path):
    """``model.cnn_weights`` for pixelbert-r50: torchvision.models.resnet50().state_dict()
    saved to a file (53 num_batches_tracked counters) loads, and the frozen trunk computes
    what torchvision's eval-mode ResNet-50 computes."""
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    state = _live_torchvision_state(reference)
    assert sum(k.endswith("num_batches_tracked") for k in state) == 53
    torch.save(state, tmp_path / "resnet50.pth")
    model = build_model("pixelbert-r50", num_layers=1).eval()  # the preset's trunk; a short transformer
    report = load_torchvision_backbone(model, tmp_path / "resnet50.pth")
    assert report.missing == []
    assert report.unexpected == []
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = trunk_forward(model.visual.backbone, images)
        theirs = _torchvision_trunk(reference, images)
    assert (ours - theirs).abs().max().item() < 1e-5, (ours - theirs).abs().max().item()


@pytest.mark.slow
def test_live_torchvision_resnext152_file_loads(tmp_path):
    """pixelbert-x152's trunk (ResNeXt-152 32x8d, torchvision's ResNet class) from a file
    saved from a live model: its counters are ignored, every trunk tensor is loaded."""
    from torchvision.models.resnet import Bottleneck

    reference = ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=8)
    state = reference.state_dict()
    assert sum(k.endswith("num_batches_tracked") for k in state) == 155
    torch.save(state, tmp_path / "resnext152.pth")
    model = build_model("pixelbert-x152", num_layers=1)
    report = load_torchvision_backbone(model, tmp_path / "resnext152.pth")
    assert report.missing == []
    assert report.unexpected == []
    for key, value in model.visual.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
