"""Files written whole or not at all: a run killed mid-write leaves the previous file (or none), never a partial one."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", private: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a new temporary file ``.<name>.<pid>.<hex>.tmp`` in ``path``'s folder for writing (``mode`` "w" or "wb");
    when the block ends normally it is flushed to disk and replaces ``path`` in one step (``os.replace``, then the
    folder is synced so the rename itself is durable), else it is removed. ``private``: the file is created readable
    by its owner only (0600: checkpoints hold generator states). A hard kill can leave the temporary file behind."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    opener = (lambda file, flags: os.open(file, flags, 0o600)) if private else None
    try:
        with open(tmp, mode.replace("w", "x"), opener=opener, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
