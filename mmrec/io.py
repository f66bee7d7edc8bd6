"""Atomic file and folder writes (nothing already stored is lost or half-written), and digests.

Every artifact is written to a temporary sibling path first and renamed into place only once
it is complete. An exception leaves the previous version untouched and removes the temporary path.
A process killed mid-write (SIGTERM, SIGKILL, power loss) cannot clean up: its temporary path is
named after its process and host (``.<name>.tmp-<pid>@<host>.<random>``), and the next write of
the same target removes it once that process is gone (``clean_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)

_HOST = socket.gethostname().replace("/", "_")
LEGACY_STALE_S = 3600
"""A temporary path without an owner in its name (written before owners were recorded) counts as
abandoned once nothing has touched it for this long."""


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it; returns the paths removed.

    ``.<name>.tmp-<pid>@<host>.*`` of a process of this host that no longer runs goes (a writer on
    another host, or one still running, is left alone); so does an owner-less
    ``.<name>.tmp-*`` untouched for ``LEGACY_STALE_S``. ``.<name>.old-<pid>[@<host>]`` (a writer
    killed between its two renames) is moved back into place when ``target`` is missing, else removed.
    """
    target = Path(target)
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return []
    owned = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)(?:@(.+?))?(?:\.[^.]*)?")
    removed = []
    for entry in os.scandir(parent):
        if not entry.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            continue
        path = Path(entry.path)
        m = owned.fullmatch(entry.name)
        if m is None or (m.group(1) == "tmp" and m.group(3) is None):
            try:
                stale = time.time() - path.lstat().st_mtime > LEGACY_STALE_S
            except FileNotFoundError:
                continue
            if not stale or entry.name.startswith(f".{name}.old-"):
                continue
        elif (m.group(3) or _HOST) != _HOST or _alive(int(m.group(2))):
            continue
        if entry.name.startswith(f".{name}.old-") and not target.exists():
            try:
                path.rename(target)  # the last complete version comes back
                continue
            except OSError:
                pass
        _remove(path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block succeeds.

    The temporary folder is a sibling of ``target`` (same file system, so the rename is atomic
    for the folder entry). An existing ``target`` is moved aside and deleted only after the new
    one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; artifacts are shared like any output
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{_owner()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary sibling of ``target`` for writing; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_owner()}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
        # after writing: a writer that replaced the file by path (safetensors) reset the mode
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are shared like any output
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_file(target, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def tensor_digest(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 hex of ``(name, tensor)`` pairs in the given order: names, shapes, dtypes and bytes.

    The fingerprint of weights: the feature cache keys encoders by it, and checkpoints record the
    frozen parameters they leave out by it.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
