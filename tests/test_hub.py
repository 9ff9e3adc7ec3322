"""Hub-style weights: ``PixelBert.from_pretrained`` takes a local export folder or a Hub
repo id (huggingface_hub's snapshot_download, replaced here by a local folder: the Hub
client's boundary only), ``push_to_hub`` uploads the folder as it is (HfApi's create_repo and
upload_folder replaced by a copy); the export's model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from pixelbert_dist.config import load_config
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.model import PixelBert, build_model
from pixelbert_dist.model.hub import push_to_hub, resolve_pretrained
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.export import write_export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("tiny")
    run_cfg = load_config(RunConfig, overrides=["model.preset=tiny", "data.train_shards=data/synthetic/train"])
    out = tmp_path_factory.mktemp("run") / "export"
    return write_export(model.config, model.state_dict(), out, load_tokenizer(), {"checkpoint": "none"}, run_cfg), model


def same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_repo_id_loads_through_snapshot_download(export, tmp_path, monkeypatch):
    folder, model = export
    cache = shutil.copytree(folder, tmp_path / "hub_cache" / "snapshot")
    asked = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = PixelBert.from_pretrained("someone/pixelbert-tiny", revision="v1")
    assert asked == [("someone/pixelbert-tiny", "v1")]
    assert same_weights(loaded, model) and not loaded.training
    assert same_weights(PixelBert.from_pretrained(folder), model)  # a local folder: no Hub call
    assert asked == [("someone/pixelbert-tiny", "v1")]


def test_neither_a_folder_nor_a_repo_id_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not/a/folder is neither an export folder on this machine nor"):
        resolve_pretrained("not/a/folder")
    with pytest.raises(FileNotFoundError, match="nowhere is neither"):
        resolve_pretrained(tmp_path / "nowhere")


def test_push_to_hub_uploads_the_export_folder_as_it_is(export, tmp_path, monkeypatch):
    folder, model = export
    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs["private"]))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, hub / repo_id)
        return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = push_to_hub(folder, "someone/pixelbert-tiny", token="hf_test", private=True)
    assert url.endswith("someone/pixelbert-tiny/commit/1")
    assert calls == [("create_repo", "someone/pixelbert-tiny", True), ("upload_folder", "someone/pixelbert-tiny")]
    pushed = hub / "someone" / "pixelbert-tiny"
    assert sorted(p.name for p in pushed.iterdir()) == sorted(p.name for p in Path(folder).iterdir())
    assert same_weights(PixelBert.from_pretrained(pushed), model)  # checksums hold after the trip


def test_push_without_a_token_says_how_to_get_one(export, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        push_to_hub(export[0], "someone/pixelbert-tiny")


def test_the_export_has_a_model_card(export):
    folder, model = export
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "# Pixel-BERT `tiny`" in card
    assert f"| parameters | {model.num_parameters() / 1e6:.1f} M |" in card
    assert "`data/synthetic/train`" in card
    assert 'PixelBert.from_pretrained("THIS_FOLDER")' in card
    assert "## Licence\n\nApache-2.0" in card
