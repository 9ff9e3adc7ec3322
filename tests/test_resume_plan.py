"""The resume's read plan (``shared_load.plan_reads``): every byte read once, each rank
near its own share, at the world sizes of the issue (no processes: a pure function)."""

from __future__ import annotations

import pytest

from pixelbert_dist.checkpoint.shared_load import Piece, bytes_per_rank, owner, plan_reads


def _table(world: int, model: int = 640_000_000, optim: int = 1_520_000_000, uneven: float = 0.0) -> dict[str, int]:
    sizes = {"mp_rank_00_model_states.pt": model, "zero_to_fp32.py": 31_000}
    for rank in range(world):
        skew = 1.0 + uneven * (rank % 3 - 1)  # some ranks own more than others
        sizes[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = int(optim / world * skew)
        sizes[f"rank_{rank:05d}_state.pt"] = 9_000
    return sizes


def test_owners_of_files():
    assert owner("zero_pp_rank_3_mp_rank_00_optim_states.pt", 8) == 3
    assert owner("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", 8) == 3
    assert owner("zero_pp_rank_3_mp_rank_00_model_states.pt", 8) == 3  # ZeRO-3: a model file per rank
    assert owner("rank_00009_state.pt", 8) == 1  # saved by more ranks: checked by rank 9 % 8
    assert owner("mp_rank_00_model_states.pt", 8) is None  # "mp_rank_00_" is no rank's own
    assert owner("zero_to_fp32.py", 8) is None


@pytest.mark.parametrize("world", [1, 2, 3, 7, 512])
def test_every_byte_is_read_once_and_owned_files_whole_by_their_owner(world):
    sizes = _table(world)
    plan = plan_reads(sizes, world)
    covered: dict[str, list[Piece]] = {}
    for rank, pieces in enumerate(plan):
        for piece in pieces:
            covered.setdefault(piece.name, []).append(piece)
            if owner(piece.name, world) is not None:
                assert (owner(piece.name, world), piece.start, piece.end) == (rank, 0, sizes[piece.name])
    for name, pieces in covered.items():
        spans = sorted((p.start, p.end) for p in pieces)
        assert spans[0][0] == 0 and spans[-1][1] == sizes[name]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
    assert set(covered) == set(sizes)
    assert sum(bytes_per_rank(plan)) == sum(sizes.values())


@pytest.mark.parametrize("world", [2, 64, 512])
@pytest.mark.parametrize("uneven", [0.0, 0.2])
def test_the_worst_rank_reads_within_a_tenth_of_its_share(world, uneven):
    sizes = _table(world, uneven=uneven)
    reads = bytes_per_rank(plan_reads(sizes, world))
    assert max(reads) <= 1.1 * sum(sizes.values()) / world
    assert max(reads) - min(reads) <= 1  # water-filling: the shared bytes even the totals out


def test_a_rank_owning_more_than_the_level_reads_only_its_own():
    sizes = {"zero_pp_rank_0_x.pt": 100, "zero_pp_rank_1_x.pt": 10, "zero_pp_rank_2_x.pt": 10, "shared.pt": 30}
    assert bytes_per_rank(plan_reads(sizes, 3)) == [100, 25, 25]
