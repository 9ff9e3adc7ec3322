"""Retrieval scores at benchmark scale: each rank's rows of the score matrix on disk, one
file per loader batch written as it finishes (a killed evaluation resumes after its last
whole batch), and recall@K computed from the rows where they lie (no rank holds the
whole matrix: COCO 5K x 25K in float32 is 500 MB, Flickr30K 1K x 5K 20 MB).

Layout: ``FOLDER/rank00003/meta.json`` (what the rows belong to) and
``FOLDER/rank00003/batch000012.safetensors`` (``images`` [n] image indices, ``scores``
[n, num_texts]). A folder whose meta differs (another model, split, world size or batch
size) is started afresh: its rows would be another matrix's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pixelbert_dist.collectives import collective_device
from pixelbert_dist.train.recall import i2t_ranks, recall_from_ranks, t2i_ahead

log = logging.getLogger(__name__)


class ScoreStore:
    """One rank's finished batches of score rows under ``folder/rankNNNNN``."""

    def __init__(self, folder: str | Path, rank: int, meta: dict):
        self.folder = Path(folder) / f"rank{rank:05d}"
        self.meta = json.loads(json.dumps(meta))  # as it reads back from JSON
        meta_path = self.folder / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()) != self.meta:
            log.info("%s holds scores of another evaluation: starting it afresh", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.is_file():
            meta_path.write_text(json.dumps(self.meta, indent=1) + "\n")

    def _path(self, batch: int) -> Path:
        return self.folder / f"batch{batch:06d}.safetensors"

    def batches_done(self) -> int:
        """Batches finished in order from the first (a batch is written whole or not at all)."""
        done = 0
        while self._path(done).is_file():
            done += 1
        return done

    def write(self, batch: int, images: torch.Tensor, scores: torch.Tensor) -> None:
        path = self._path(batch)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"images": images.long().contiguous(), "scores": scores.float().contiguous()}, str(tmp))
        os.replace(tmp, path)

    def rows(self, num_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's image indices [n] and score rows [n, num_texts], all batches."""
        parts = [load_file(str(self._path(k))) for k in range(self.batches_done())]
        if not parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, num_texts)
        return torch.cat([p["images"] for p in parts]), torch.cat([p["scores"] for p in parts])


def load_score_matrix(folder: str | Path, num_images: int, num_texts: int) -> torch.Tensor:
    """Every rank's rows assembled into the [num_images, num_texts] matrix (small sets,
    analysis and tests; the evaluation itself never builds it)."""
    out = torch.full((num_images, num_texts), float("nan"))
    for rank_dir in sorted(Path(folder).glob("rank*")):
        for path in sorted(rank_dir.glob("batch*.safetensors")):
            part = load_file(str(path))
            out[part["images"]] = part["scores"]
    if torch.isnan(out).any():
        raise ValueError(f"{folder}: {int(torch.isnan(out).any(1).sum())} image row(s) have no scores")
    return out


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = tensor.to(collective_device())
        dist.all_reduce(moved)
        return moved.cpu()
    return tensor


def sharded_recall(
    images: torch.Tensor,
    rows: torch.Tensor,
    owner: torch.Tensor,
    num_images: int,
    ks: Sequence[int] = (1, 5, 10),
    all_reduce=_all_reduce,
    t2i_rows: torch.Tensor | None = None,
) -> dict[str, float]:
    """``recall_at_k`` of the whole matrix from each rank's rows (``images`` [n], ``rows``
    [n, num_texts]; every image on exactly one rank). Four all-reduces (sums) of
    O(num_images + num_texts): coverage, the positives' scores, the IR counts, the TR ranks.
    ``t2i_rows``: other rows for IR (two-stage retrieval ranks each direction's own
    candidates, ``rerank``); default ``rows``."""
    t2i_rows = rows if t2i_rows is None else t2i_rows
    if torch.isnan(rows).any() or torch.isnan(t2i_rows).any():
        raise ValueError("scores contain NaN")
    owner = torch.as_tensor(owner, dtype=torch.long)
    covered = all_reduce(torch.bincount(images, minlength=num_images).double())
    if not bool((covered == 1).all()):
        raise ValueError(
            f"score rows cover {int((covered > 0).sum())} of {num_images} images once or more, need each once"
        )
    local = torch.full((num_images,), -1, dtype=torch.long)
    local[images] = torch.arange(images.numel())
    mine = local[owner] >= 0
    own_score = torch.zeros(owner.numel(), dtype=torch.float64)
    own_score[mine] = t2i_rows[local[owner[mine]], mine.nonzero()[:, 0]].double()
    own_score = all_reduce(own_score).to(t2i_rows.dtype)  # exact: every other rank adds 0 (-inf stays)
    t2i = all_reduce(t2i_ahead(t2i_rows, images, owner, own_score).double())
    i2t = torch.zeros(num_images, dtype=torch.float64)
    i2t[images] = i2t_ranks(rows, images, owner).double()
    i2t = all_reduce(i2t)
    return recall_from_ranks(i2t.long(), t2i.long(), ks)
