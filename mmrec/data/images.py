"""Image stores: item images as files under a folder, or in an LMDB as NineRec/PMMRec ship them.

A catalog refers to an item's image by a reference string: a path relative to the store's folder
(``files``), or a key (``lmdb``). A reference that would leave the folder (``../../etc/passwd``,
an absolute path, a symlink pointing outside) is refused, never opened.

NineRec/PMMRec LMDBs hold, under the ASCII item id, a pickled ``LMDB_Image`` object with the raw
uint8 array (``channels``, ``size``, ``image`` bytes). Those pickles are read with a restricted
unpickler that only rebuilds that one class, so a hostile file cannot run code. Values that are
encoded image files (JPEG/PNG bytes) are read as well.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

STORE_KINDS = ("files", "lmdb")


class ImageError(Exception):
    """An image reference cannot be read; ``status`` says why."""

    def __init__(self, ref: str, status: str, detail: str):
        super().__init__(f"image {ref!r}: {detail}")
        self.ref, self.status, self.detail = ref, status, detail


class LMDB_Image:  # noqa: N801 - the class name NineRec/PMMRec pickles carry
    """A raw uint8 image array, laid out as the NineRec/PMMRec LMDB files store it."""

    def __init__(self, image: np.ndarray, id: str):  # noqa: A002 - attribute names of the format
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim == 2:
            image = image[:, :, None]
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.id = id

    def get_image(self) -> np.ndarray:
        return np.frombuffer(self.image, dtype=np.uint8).reshape(*self.size, self.channels)


class _LmdbUnpickler(pickle.Unpickler):
    """Rebuilds ``LMDB_Image`` from whatever module it was pickled in; refuses every other global."""

    def find_class(self, module, name):
        if name == "LMDB_Image":
            return LMDB_Image
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _decode(data: bytes, ref: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # forces a full decode: catches truncated files, not just bad headers
    except UnidentifiedImageError as exc:
        raise ImageError(ref, "corrupt", "not a readable image file") from exc
    except Image.DecompressionBombError as exc:  # a tiny file claiming a huge canvas
        raise ImageError(ref, "corrupt", f"refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(ref, "corrupt", f"cannot be decoded ({exc})") from exc
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageStore:
    """Where a catalog's images live."""

    kind: str
    """``files`` (one file per item under ``root``) or ``lmdb`` (an LMDB environment at ``root``)."""
    root: Path

    def __post_init__(self):
        if self.kind not in STORE_KINDS:
            raise ValueError(f"unknown image store kind {self.kind!r}; valid kinds: {list(STORE_KINDS)}")

    def resolve(self, ref: str) -> Path:
        """The file for ``ref`` (``files`` stores), refusing references that escape ``root``."""
        if not ref or "\x00" in ref:
            raise ImageError(ref, "escapes", "empty or invalid path")
        if os.path.isabs(ref) or Path(ref).drive:
            raise ImageError(ref, "escapes", f"absolute path outside the image folder {self.root}")
        root = self.root.resolve()
        path = (root / ref).resolve()  # follows symlinks, so a link pointing outside is caught too
        if path != root and root not in path.parents:
            raise ImageError(ref, "escapes", f"path escapes the image folder {root}")
        return path

    def read_bytes(self, ref: str) -> bytes:
        if self.kind == "files":
            path = self.resolve(ref)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise ImageError(ref, "missing", f"file not found: {path}") from None
            except IsADirectoryError:
                raise ImageError(ref, "missing", f"is a folder, not a file: {path}") from None
            except OSError as exc:
                raise ImageError(ref, "missing", f"cannot be read: {exc}") from exc
        return _lmdb_get(self.root, ref)

    def read(self, ref: str) -> Image.Image:
        """The decoded RGB image for ``ref``; raises ``ImageError`` (status missing/corrupt/escapes)."""
        if self.kind == "lmdb":
            data = _lmdb_get(self.root, ref)
            if data[:1] == b"\x80":  # pickle protocol >= 2
                try:
                    obj = _LmdbUnpickler(io.BytesIO(data)).load()
                    arr = obj.get_image()
                except Exception as exc:  # any broken pickle is a corrupt entry, reported as such
                    raise ImageError(ref, "corrupt", f"LMDB entry is not a valid LMDB_Image ({exc})") from exc
                return Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("RGB")
            return _decode(data, ref)
        return _decode(self.read_bytes(ref), ref)

    def check(self, ref: str) -> str:
        """``ok`` or the failure status of ``ref`` (missing, corrupt, escapes)."""
        try:
            self.read(ref)
        except ImageError as exc:
            return exc.status
        return "ok"

    def exists(self, ref: str) -> str:
        """Like ``check`` but without decoding: ``ok``, ``missing`` or ``escapes``."""
        try:
            if self.kind == "files":
                return "ok" if self.resolve(ref).is_file() else "missing"
            _lmdb_get(self.root, ref)
        except ImageError as exc:
            return exc.status
        return "ok"


_LMDB_ENVS: dict[tuple[Path, int, int], object] = {}
"""Open read-only environments, keyed by path AND the data file's inode and mtime: a database
rewritten at the same path (``write_lmdb`` renames a new folder into place) is opened afresh
by long-running processes such as the Dagster daemon."""


# an LMDB environment must not be used across fork(): DataLoader workers start with none
os.register_at_fork(after_in_child=_LMDB_ENVS.clear)


def _lmdb_get(root: Path, ref: str) -> bytes:
    import lmdb

    data_file = root / "data.mdb" if root.is_dir() else root
    try:
        st = data_file.stat()
    except FileNotFoundError:
        raise ImageError(ref, "missing", f"LMDB not found: {root}") from None
    key = (root, st.st_ino, st.st_mtime_ns)
    env = _LMDB_ENVS.get(key)
    if env is None:
        for stale in [k for k in _LMDB_ENVS if k[0] == root]:
            _LMDB_ENVS.pop(stale).close()
        env = lmdb.open(str(root), readonly=True, lock=False, readahead=False, subdir=root.is_dir())
        _LMDB_ENVS[key] = env
    with env.begin() as txn:
        data = txn.get(ref.encode("utf-8"))
    if data is None:
        raise ImageError(ref, "missing", f"key not in LMDB {root}")
    return bytes(data)


def write_lmdb(path: str | os.PathLike, images: dict[str, np.ndarray], map_size: int = 1 << 30) -> None:
    """Write ``{item_id: uint8 HxWxC array}`` as a NineRec/PMMRec-style LMDB of pickled arrays."""
    import lmdb

    from mmrec.io import atomic_dir

    with atomic_dir(path) as tmp:
        env = lmdb.open(str(tmp), map_size=map_size)
        with env.begin(write=True) as txn:
            for key, arr in images.items():
                txn.put(str(key).encode("utf-8"), pickle.dumps(LMDB_Image(arr, str(key)), protocol=4))
        env.close()
