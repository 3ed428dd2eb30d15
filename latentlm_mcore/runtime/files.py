"""One atomic file write: readers, and a crash at any point, see the old file or the complete new one.

The new content goes to a temporary file in the same folder (same file system, so the rename is atomic),
is flushed and fsync-ed, and is renamed over the target; on any error the temporary file is removed and the
old file is left as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode: str = "w"):
    """`with atomic_write(path, "wb") as f: ...`: `f` is a temporary file that replaces `path` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write({path!r}): mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path, obj, indent: int = 1) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)


def atomic_torch_save(obj, path) -> None:
    """torch.save through `atomic_write`."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
