"""A resume in which every rank reads about its own share of the checkpoint, once.

DeepSpeed's ``load_checkpoint`` makes every rank read ``mp_rank_00_model_states.pt``
whole (twice), and the verification before it read each file by another rank than the
one loading it. Here one pass reads, checks and keeps what the load needs:

* a file that one rank owns (``zero_pp_rank_R_*``, ``rank_R_state.pt``) is read by rank R;
* the files no rank owns (the model file, DeepSpeed's scripts) are read in byte ranges,
  sized so that every rank's total comes out even (water-filling over what each rank
  owns), and all-gathered over the process group: the interconnect carries what W
  readers of one file would otherwise ask of the file system;
* every rank checks the sha256 of each file it holds (its own files, and each shared file
  as assembled) against ``meta.json``, and the ranks agree on the verdict, so a damaged
  checkpoint is skipped as before (``choose.py`` falls back to the newest intact one).

What a verification read is kept (``hold``) until ``engine_io.load`` hands it to
DeepSpeed through ``SharedFileEngine``, so nothing is read twice. ``plan_reads`` is a pure
function of the file table and the world size: the benchmark sizes it at 512 ranks.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pixelbert_dist.checkpoint import files
from pixelbert_dist.collectives import collective_device, gather_objects

_OWNED = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rank_(\d+)_state\.pt$")


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of one file of the checkpoint."""

    name: str
    start: int
    end: int


def owner(name: str, world: int) -> int | None:
    """The rank that reads ``name`` whole, or None for a shared file. Files of ranks past
    this world (a checkpoint of a larger run, resumed through the universal checkpoint)
    are checked by rank ``R % world``."""
    match = _OWNED.match(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2)) % world


def _quotas(own: list[int], shared: int) -> list[int]:
    """Bytes of the shared files each rank reads: the ranks that own least take most, so
    that ``own[r] + quota[r]`` is as even as the shared bytes allow (water-filling: the
    level reaches the k ranks owning least, k as large as the bytes allow)."""
    order = sorted(range(len(own)), key=own.__getitem__)
    reached, prefix = 1, 0
    for i, rank in enumerate(order):
        prefix += own[rank]
        if shared + prefix >= own[rank] * (i + 1):
            reached = i + 1
    level = (shared + sum(own[r] for r in order[:reached])) // reached
    quotas = [0] * len(own)
    for rank in order[:reached]:
        quotas[rank] = level - own[rank]
    for rank in order[: shared - sum(quotas)]:  # the remainder of the division, a byte each
        quotas[rank] += 1
    return quotas


def plan_reads(sizes: dict[str, int], world: int) -> list[list[Piece]]:
    """What each of ``world`` ranks reads of a checkpoint whose files have ``sizes``."""
    plan: list[list[Piece]] = [[] for _ in range(world)]
    shared = []
    for name in sorted(sizes):
        rank = owner(name, world)
        if rank is None:
            shared.append(name)
        else:
            plan[rank].append(Piece(name, 0, sizes[name]))
    own = [sum(p.end for p in pieces) for pieces in plan]
    quotas = _quotas(own, sum(sizes[n] for n in shared))
    starts = [sum(quotas[:r]) for r in range(world)]  # each rank's range of the shared files laid end to end
    offset = 0
    for name in shared:
        for rank in range(world):
            lo, hi = max(starts[rank], offset), min(starts[rank] + quotas[rank], offset + sizes[name])
            if lo < hi:
                plan[rank].append(Piece(name, lo - offset, hi - offset))
        offset += sizes[name]
    return plan


def bytes_per_rank(plan: list[list[Piece]]) -> list[int]:
    return [sum(p.end - p.start for p in pieces) for pieces in plan]


@dataclass
class TagReads:
    """One rank's reads of one tag: the whole files it holds, and what it read for them."""

    tag_dir: Path
    held: dict[str, bytes] = field(default_factory=dict)
    bytes_read: int = 0
    problem: str | None = None
    names: frozenset[str] = frozenset()  # every file of the tag (meta.json's table): empty when unknown


def _read_piece(path: Path, piece: Piece, size: int) -> tuple[bytearray, str | None]:
    """``piece`` of ``path``, or what is wrong with the file: a reader also checks that
    the file has the recorded ``size`` (a longer file fails as a shorter one does)."""
    data = bytearray(piece.end - piece.start)
    try:
        with open(path, "rb") as fh:
            fh.seek(piece.start)
            got = fh.readinto(data)
            actual = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return data, f"{path} is missing"
    except OSError as err:
        return data, f"{path} cannot be read: {err.strerror or err}"
    if got != len(data) or actual != size:
        return data, f"{path} has {actual} bytes, meta.json recorded {size} (truncated or overwritten)"
    return data, None


def _gather_file(name: str, size: int, plan: list[list[Piece]], mine: bytearray) -> bytes:
    """Every rank's piece of the shared file ``name``, assembled on every rank (a piece a
    rank could not read arrives short: the size check then fails on every rank)."""
    spans = [next(((p.start, p.end) for p in pieces if p.name == name), (0, 0)) for pieces in plan]
    width = max(end - start for start, end in spans)
    local = torch.zeros(width, dtype=torch.uint8)
    if mine:
        local[: len(mine)] = torch.frombuffer(mine, dtype=torch.uint8)
    device = collective_device()
    rows = torch.empty(len(plan), width, dtype=torch.uint8, device=device)
    tdist.all_gather(list(rows.unbind(0)), local.to(device))
    rows = rows.cpu()
    whole = torch.empty(size, dtype=torch.uint8)
    for r, (start, end) in enumerate(spans):
        whole[start:end] = rows[r, : end - start]
    return whole.numpy().tobytes()  # bytes: io.BytesIO then reads it without a copy


def _check(name: str, data: bytes, entry: dict, tag_dir: Path) -> str | None:
    if len(data) != entry["size"]:
        return f"{tag_dir / name} has {len(data)} bytes, meta.json recorded {entry['size']} (truncated or overwritten)"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return f"{tag_dir / name}: sha256 differs from the one meta.json recorded (the file is corrupted)"
    return None


def read_tag(tag_dir: Path, table: dict[str, dict]) -> TagReads:
    """Read this rank's share of ``tag_dir`` (a collective), check every file it then holds
    against ``table`` (meta.json's), and agree with the other ranks on the first problem."""
    rank, world = files.rank(), files.world()
    plan = plan_reads({name: entry["size"] for name, entry in table.items()}, world)
    reads, problems, pieces = TagReads(tag_dir, names=frozenset(table)), [], {}
    for piece in plan[rank]:
        pieces[piece.name], problem = _read_piece(tag_dir / piece.name, piece, table[piece.name]["size"])
        reads.bytes_read += piece.end - piece.start
        problems += [problem] if problem else []
    found = [p for mine in gather_objects(problems) for p in mine]
    if found:  # a file missing or of the wrong size: nothing to gather or hash
        reads.problem = found[0]
        return reads
    for name in sorted(table):
        if owner(name, world) is None:
            data = _gather_file(name, table[name]["size"], plan, pieces.pop(name, bytearray()))
        elif name in pieces:
            data = bytes(pieces.pop(name))
        else:
            continue
        if hashlib.sha256(data).hexdigest() != table[name]["sha256"]:
            problems.append(f"{tag_dir / name}: sha256 differs from the one meta.json recorded (the file is corrupted)")
        elif name.endswith(".pt"):
            reads.held[name] = data
    found = [p for mine in gather_objects(problems) for p in mine]
    reads.problem = found[0] if found else None
    if reads.problem:
        reads.held.clear()
    return reads


class SharedFileEngine(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface for loading: a file of ``reads`` comes from
    memory (read and checked already); any other (a universal checkpoint's) from the file
    system, a shared one read by rank 0 and broadcast."""

    def __init__(self, real: CheckpointEngine, reads: TagReads):
        super().__init__()
        self.name = "SharedFileEngine"
        self.real = real
        self.reads = reads
        self._broadcast: dict[str, object] = {}  # DeepSpeed asks for the model file twice

    def load(self, path: str, map_location=None):
        name = os.path.basename(path)
        if Path(path).parent == self.reads.tag_dir and name in self.reads.held:
            return self.real.load(io.BytesIO(self.reads.held[name]), map_location=map_location)
        if owner(name, files.world()) is not None or files.world() == 1:
            self.reads.bytes_read += os.path.getsize(path)
            return self.real.load(path, map_location=map_location)
        if path not in self._broadcast:
            box = [None]
            if files.rank() == 0:
                self.reads.bytes_read += os.path.getsize(path)
                box = [self.real.load(path, map_location="cpu")]
            tdist.broadcast_object_list(box, src=0)  # every rank loads a shared file, in the same order
            self._broadcast[path] = box[0]
        return self._broadcast.pop(path)

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        raise NotImplementedError("the shared-file engine only loads")

    def commit(self, info) -> bool:
        return True


def _listed_pattern(name: str, names: frozenset[str]) -> str:
    """``name``, or DeepSpeed's older optimizer-file pattern when only that one is listed."""
    older = name.replace("_optim_states.pt", "optim_states.pt")
    return older if os.path.basename(name) not in names and os.path.basename(older) in names else name


def _zero_names_from_table(engine, names: frozenset[str]):
    """DeepSpeed's ``_get_all_zero_checkpoint_names`` without its file-system probes: it
    ``stat``s every data-parallel rank's optimizer file on every rank (W^2 calls at a
    resume: 262,144 at 512 ranks) to pick the file name pattern; the tag's file table
    answers that already."""

    def names_of(load_dir, tag, bf16_mode):
        found = engine._get_mp_rank_zero_checkpoint_names(
            load_dir=load_dir,
            tag=tag,
            mp_rank=engine.checkpoint_mp_rank,
            dp_world_size=engine.loaded_checkpoint_dp_world_size,
            bf16_mode=bf16_mode,
        )
        return [_listed_pattern(name, names) for name in found]

    return names_of


@contextmanager
def shared_file_reads(engine, reads: TagReads):
    """``engine.load_checkpoint`` inside takes the files of ``reads`` from memory, and
    names the ZeRO files from the tag's file table (no per-file ``stat``)."""
    real = engine.checkpoint_engine
    engine.checkpoint_engine = SharedFileEngine(real, reads)
    if reads.names:  # an instance attribute: DeepSpeed's method stays as it is for other loads
        engine._get_all_zero_checkpoint_names = _zero_names_from_table(engine, reads.names)
    try:
        yield engine.checkpoint_engine
    finally:
        engine.checkpoint_engine = real
        engine.__dict__.pop("_get_all_zero_checkpoint_names", None)


# Reads kept from a verification until the load takes them (one tag at a time).
_kept: dict[Path, TagReads] = {}


def keep(reads: TagReads) -> None:
    _kept.clear()
    _kept[reads.tag_dir] = reads


def take(tag_dir: Path) -> TagReads | None:
    """The reads kept for ``tag_dir`` (forgotten here: memory goes with the load)."""
    reads = _kept.pop(tag_dir, None)
    _kept.clear()
    return reads


def verify(tag_dir: Path, keep_reads: bool = False) -> str | None:
    """What is wrong with ``tag_dir`` (the first problem, named by file), or None when it is
    intact; a collective. With ``keep_reads`` an intact tag's reads stay in memory for the
    load that follows (``take``). A meta.json without a file table (the older format) is
    checked by ``files.verify`` (each file read through, its zip CRCs checked)."""
    try:
        meta, problem = files.read_meta(tag_dir), None
    except files.CheckpointError as err:
        meta, problem = {}, str(err)
    problem = next((p for p in gather_objects(problem) if p), None)  # one rank's FS hiccup stops all alike
    if problem or "files" not in meta:
        return problem or files.verify(tag_dir)
    reads = read_tag(Path(tag_dir), meta["files"])
    if keep_reads and reads.problem is None:
        keep(reads)
    return reads.problem
