"""Image stores: item images as files under a folder, or in an LMDB as NineRec/PMMRec ship them.

A catalog refers to an item's image by a reference string: a path relative to the store's folder
(``files``), or a key (``lmdb``). A reference that would leave the folder (``../../etc/passwd``,
an absolute path, a symlink pointing outside) is refused, never opened.

NineRec/PMMRec LMDBs hold, under the ASCII item id, a pickled ``LMDB_Image`` object with the raw
uint8 array (``channels``, ``size``, ``image`` bytes). Those pickles are read with a restricted
unpickler that only rebuilds that one class, so a hostile file cannot run code. Values that are
encoded image files (JPEG/PNG bytes) are read as well.

A reference that cannot be read fails with an ``ImageError`` whose ``status`` says why, so that a
report tells the user what to fix at the source (``FAILURES``). A store that is not what it is
configured as (a file or folder that is not an LMDB) is not a per-image failure: it raises
``ImageStoreError`` naming the path, once.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

STORE_KINDS = ("files", "lmdb")

FAILURES = {
    "missing": "no such file or LMDB key",
    "escapes": "the reference leaves the image folder (refused, never opened)",
    "not_an_image": "the data is not an image format PIL can identify",
    "truncated": "the image data ends early (a partial download or copy)",
    "too_many_pixels": "width x height above the pixel limit (validation.max_image_pixels)",
    "unreadable": "an identified image or LMDB entry that cannot be decoded",
}
"""Why an image reference cannot be used: ``ImageError.status`` -> what it means."""


class ImageError(Exception):
    """An image reference cannot be read; ``status`` (a key of ``FAILURES``) says why."""

    def __init__(self, ref: str, status: str, detail: str):
        super().__init__(f"image {ref!r}: {detail}")
        self.ref, self.status, self.detail = ref, status, detail


class ImageStoreError(ValueError):
    """The store itself is unusable (e.g. configured as an LMDB but not one); names its path."""


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


def _broken(ref: str, exc: BaseException) -> ImageError:
    """``truncated`` when PIL ran out of data, else ``unreadable``."""
    truncated = isinstance(exc, EOFError) or "truncat" in str(exc).lower()
    return ImageError(ref, "truncated" if truncated else "unreadable", f"cannot be decoded ({exc})")


def _check_pixels(ref: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(ref, "too_many_pixels", f"{width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}")


def _decode(data: bytes, ref: str, max_pixels: int | None = None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
    except UnidentifiedImageError as exc:
        raise ImageError(ref, "not_an_image", "not an image file PIL can identify") from exc
    except Image.DecompressionBombError as exc:  # a tiny file claiming a huge canvas
        raise ImageError(ref, "too_many_pixels", f"refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(ref, exc) from exc
    _check_pixels(ref, *img.size, max_pixels)
    try:
        img.load()  # forces a full decode: catches truncated files, not just bad headers
    except Image.DecompressionBombError as exc:
        raise ImageError(ref, "too_many_pixels", f"refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(ref, exc) from exc
    return img.convert("RGB")


def _decode_lmdb_image(data: bytes, ref: str, max_pixels: int | None) -> Image.Image:
    """A pickled ``LMDB_Image``: the size is checked before the array is built."""
    try:
        obj = _LmdbUnpickler(io.BytesIO(data)).load()
        (height, width), channels, raw = (int(x) for x in obj.size), int(obj.channels), obj.image
        if not isinstance(raw, bytes):
            raise TypeError(f"image is {type(raw).__name__}, not bytes")
    except Exception as exc:  # any broken pickle is an unreadable entry, reported as such
        raise ImageError(ref, "unreadable", f"LMDB entry is not a valid LMDB_Image ({exc})") from exc
    _check_pixels(ref, width, height, max_pixels)
    need = height * width * channels
    if len(raw) != need:
        raise ImageError(ref, "truncated" if len(raw) < need else "unreadable",
                         f"LMDB_Image holds {len(raw)} bytes, a {height}x{width}x{channels} array needs {need}")
    arr = obj.get_image()
    try:
        return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr).convert("RGB")
    except (TypeError, ValueError) as exc:  # e.g. 2 channels
        raise ImageError(ref, "unreadable", f"LMDB_Image with {channels} channels cannot be an image ({exc})") from exc


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

    def read(self, ref: str, max_pixels: int | None = None) -> Image.Image:
        """The decoded RGB image for ``ref``; raises ``ImageError`` (``status``: a key of ``FAILURES``).

        ``max_pixels`` refuses larger images from their header, before decoding (a 169-megapixel
        image costs about 1 GB per decode); None leaves only PIL's decompression-bomb guard.
        """
        if self.kind == "lmdb":
            data = _lmdb_get(self.root, ref)
            if data[:1] == b"\x80":  # pickle protocol >= 2
                return _decode_lmdb_image(data, ref, max_pixels)
            return _decode(data, ref, max_pixels)
        return _decode(self.read_bytes(ref), ref, max_pixels)

    def check(self, ref: str, max_pixels: int | None = None) -> str:
        """``ok`` or the failure status of ``ref`` (a key of ``FAILURES``)."""
        try:
            self.read(ref, max_pixels)
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

    def verify(self) -> None:
        """Raise ``ImageStoreError`` if an existing LMDB store cannot be opened as one.

        A store that does not exist at all is left to the per-image checks (every image is then
        ``missing``), as for a files store.
        """
        if self.kind == "lmdb" and self.root.exists():
            _lmdb_env(self.root)


_LMDB_ENVS: dict[tuple[Path, int, int], object] = {}
"""Open read-only environments, keyed by path AND the data file's inode and mtime: a database
rewritten at the same path (``write_lmdb`` renames a new folder into place) is opened afresh
by long-running processes such as the Dagster daemon."""


# an LMDB environment must not be used across fork(): DataLoader workers start with none
os.register_at_fork(after_in_child=_LMDB_ENVS.clear)


_LMDB_LOCK = threading.Lock()
"""LMDB refuses a second open of an environment in one process: validation's image threads open
through this lock, so only the first opens and the others wait and reuse the cached one."""


def _lmdb_env(root: Path):
    """The cached read-only environment at ``root``; FileNotFoundError if nothing is there."""
    import lmdb

    data_file = root / "data.mdb" if root.is_dir() else root
    if root.is_dir() and not data_file.exists():
        if not any(root.iterdir()):
            raise FileNotFoundError(data_file)
        raise ImageStoreError(f"{root}: configured as an LMDB image store, but the folder holds no data.mdb (not an LMDB)")
    st = data_file.stat()  # FileNotFoundError when the store is absent
    key = (root, st.st_ino, st.st_mtime_ns)
    with _LMDB_LOCK:
        env = _LMDB_ENVS.get(key)
        if env is None:
            for stale in [k for k in _LMDB_ENVS if k[0] == root]:
                _LMDB_ENVS.pop(stale).close()
            try:
                env = lmdb.open(str(root), readonly=True, lock=False, readahead=False, subdir=root.is_dir())
            except lmdb.Error as exc:
                raise ImageStoreError(f"{root}: configured as an LMDB image store, but it cannot be opened as one ({exc})") from None
            _LMDB_ENVS[key] = env
    return env


def _lmdb_get(root: Path, ref: str) -> bytes:
    try:
        env = _lmdb_env(root)
    except FileNotFoundError:
        raise ImageError(ref, "missing", f"LMDB not found: {root}") from None
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
