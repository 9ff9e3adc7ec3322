"""Export folders on the Hugging Face Hub, through ``huggingface_hub`` (transformers' own
dependency): ``PixelBert.from_pretrained("owner/name")`` downloads one (``snapshot_download``,
into the Hub's cache) and loads it as a local folder, checksums verified; ``push_to_hub``
uploads one (``HfApi.upload_folder``) where a token and a network exist.

Why not ``PyTorchModelHubMixin``: its ``save_pretrained`` writes its own config.json (the
constructor's arguments) and its ``push_to_hub`` calls that save, while an export here is
config.json with the sha256 of each weight file, the tokenizer, the input settings and the
model card, written by the pre-training export. Uploading that folder as it is keeps one
format on disk and on the Hub.

    python -m pixelbert_dist.model.hub push EXPORT_DIR OWNER/NAME [--private]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells them


def resolve_pretrained(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local export folder as it is; ``owner/name`` that is no local folder: the Hub
    repository's snapshot (downloaded once, then read from the Hub's cache)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if not REPO_ID.match(text) or path.exists():
        raise FileNotFoundError(
            f"{text} is neither an export folder on this machine nor a Hugging Face Hub repo id (owner/name)"
        )
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=text, revision=revision))
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{text}: no such folder here, and no such model repository on the Hub") from None


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload a pixelbert_dist export",
) -> str:
    """Upload an export folder (config.json, weights, tokenizer, README.md) to ``repo_id``,
    created if needed; the commit's URL."""
    import huggingface_hub

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: push an export folder (RUN/export)")
    token = token or huggingface_hub.get_token()
    if not token:
        raise PermissionError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="upload an export folder to the Hugging Face Hub")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="python -m pixelbert_dist.model.hub push EXPORT_DIR OWNER/NAME")
    push.add_argument("folder", type=Path)
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(push_to_hub(args.folder, args.repo_id, private=args.private))
    except (FileNotFoundError, PermissionError) as err:
        raise SystemExit(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
