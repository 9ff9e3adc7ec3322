"""DeepSpeed's one-time op build, said before it starts: on a CPU its first process group
JIT-compiles a shared-memory all-reduce op (~30-60 s, then cached under
TORCH_EXTENSIONS_DIR), a silent minute without this line."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
BUILD_NOTICE = "building DeepSpeed's shared-memory op (first run, ~30-60 s; cached in %s)..."


def pending_shm_op_build() -> Path | None:
    """The folder DeepSpeed is about to compile its shared-memory op into, else None: its
    CPU accelerator has the op (the test ``deepspeed.comm.torch.build_shm_op`` makes) and
    the folder holds no build of it for this interpreter. ninja rebuilds when the compile
    command changes, and the command names the source and torch paths: a build made from
    a venv at another path (a symlinked .venv, another checkout) is built again."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory, include_paths

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))  # what torch's JIT load uses
    ninja, library = folder / "build.ninja", folder / f"{builder.NAME}.so"
    # torch rewrites build.ninja only when the command changes: a library older than it is
    # from an earlier command, or a build stopped half-way
    if not library.is_file() or not ninja.is_file() or library.stat().st_mtime < ninja.stat().st_mtime:
        return folder
    paths = [builder.deepspeed_src_path(source) for source in builder.sources()] + include_paths()[:1]
    command = ninja.read_text(errors="replace")
    return None if all(str(path) in command for path in paths) else folder


def announce_op_build() -> None:
    """One line before a first run's op build (rank 0's log shows it)."""
    folder = pending_shm_op_build()
    if folder is not None:
        log.info(BUILD_NOTICE, folder)
