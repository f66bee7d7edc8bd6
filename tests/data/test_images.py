"""Image stores: files and LMDB, one status per kind of failure, a pixel limit, restricted unpickling."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from mmrec.data import images
from mmrec.data.images import (
    FAILURES, STORE_KINDS, ImageError, ImageStore, ImageStoreError, LMDB_Image, _LmdbUnpickler, write_lmdb,
)

RGB = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7  # (H=4, W=3, C=3), all pixels distinct


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An image folder ``imgs/`` with one good PNG, one in a sub-folder, and broken files; a secret outside."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    good = _png(RGB)
    (root / "good.png").write_bytes(good)
    (root / "sub" / "gray.png").write_bytes(_png(np.full((2, 2), 9, dtype=np.uint8)))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    (root / "text.png").write_text("hello, I am a text file\n", encoding="utf-8")
    (tmp_path / "secret.png").write_bytes(good)  # a readable image, but outside the folder
    return root


def _status_of(store: ImageStore, ref: str) -> str:
    with pytest.raises(ImageError) as info:
        store.read(ref)
    assert info.value.ref == ref
    assert repr(ref) in str(info.value)
    return info.value.status


def test_unknown_store_kind_lists_the_valid_ones(tmp_path):
    assert STORE_KINDS == ("files", "lmdb")
    with pytest.raises(ValueError, match=r"unknown image store kind 'zip'; valid kinds: \['files', 'lmdb'\]"):
        ImageStore("zip", tmp_path)


# -- files store
def test_files_read_decodes_to_rgb(folder):
    store = ImageStore("files", folder)
    img = store.read("good.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), RGB)
    gray = store.read("sub/gray.png")
    assert gray.mode == "RGB" and gray.size == (2, 2)
    assert np.asarray(gray).tolist() == [[[9, 9, 9]] * 2] * 2
    assert store.read_bytes("good.png") == (folder / "good.png").read_bytes()


def test_files_ok_references(folder):
    store = ImageStore("files", folder)
    for ref in ("good.png", "sub/gray.png", "sub/../good.png", "./good.png"):
        assert store.check(ref) == "ok", ref
        assert store.exists(ref) == "ok", ref
    assert store.resolve("sub/../good.png") == (folder / "good.png").resolve()


@pytest.mark.parametrize("ref", ["nope.png", "sub/nope.png", "sub", "sub/"])
def test_files_missing(folder, ref):
    store = ImageStore("files", folder)
    assert store.check(ref) == "missing"
    assert store.exists(ref) == "missing"
    assert _status_of(store, ref) == "missing"


@pytest.mark.parametrize("ref, status", [
    ("truncated.png", "truncated"), ("random.png", "not_an_image"), ("text.png", "not_an_image"),
])
def test_files_broken_is_found_by_check_not_by_exists(folder, ref, status):
    store = ImageStore("files", folder)
    assert store.check(ref) == status
    assert store.exists(ref) == "ok"  # exists only looks for the file, it does not decode
    assert _status_of(store, ref) == status


def test_truncated_png_is_truncated_although_its_header_is_fine(folder):
    # the header alone opens: only a full decode finds the truncation
    Image.open(folder / "truncated.png")
    assert ImageStore("files", folder).check("truncated.png") == "truncated"


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_each_kind_of_failure_has_its_own_status(folder):
    # regression: every decode failure used to be reported as 'corrupt'
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    jpg = _jpeg(noisy)
    (folder / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])  # a partial download
    (folder / "cut_header.png").write_bytes(_png(RGB)[:20])  # ends inside the PNG header
    (folder / "notes.jpg").write_text("not a picture", encoding="utf-8")
    (folder / "bad_idat.png").write_bytes(_png(RGB).replace(b"IDAT", b"IDAT\xff\xff", 1))
    store = ImageStore("files", folder)
    got = {ref: store.check(ref) for ref in ("cut.jpg", "cut_header.png", "notes.jpg", "bad_idat.png")}
    assert got == {"cut.jpg": "truncated", "cut_header.png": "truncated", "notes.jpg": "not_an_image",
                   "bad_idat.png": "unreadable"}
    assert set(got.values()) | {"missing", "escapes", "too_many_pixels"} == set(FAILURES)


@pytest.mark.parametrize("ref", ["../secret.png", "../../etc/passwd", "sub/../../secret.png", "/etc/passwd", "", "a\x00b"])
def test_files_escapes_are_refused(folder, ref, monkeypatch):
    store = ImageStore("files", folder)
    opened = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or real(self))
    assert store.check(ref) == "escapes"
    assert store.exists(ref) == "escapes"
    assert _status_of(store, ref) == "escapes"
    with pytest.raises(ImageError, match="escape|absolute|invalid"):
        store.read_bytes(ref)
    assert opened == []  # refused, never opened


def test_absolute_path_inside_the_folder_is_still_refused(folder):
    # a catalog names images relative to the store; an absolute one is refused even if it points inside
    store = ImageStore("files", folder)
    assert store.check(str(folder / "good.png")) == "escapes"


def test_symlink_pointing_outside_is_refused(folder):
    (folder / "link.png").symlink_to(folder.parent / "secret.png")
    (folder / "linkdir").symlink_to(folder.parent, target_is_directory=True)
    store = ImageStore("files", folder)
    for ref in ("link.png", "linkdir/secret.png"):
        assert store.check(ref) == "escapes", ref
        assert store.exists(ref) == "escapes", ref
        assert _status_of(store, ref) == "escapes"


def test_symlink_pointing_inside_is_followed(folder):
    (folder / "alias.png").symlink_to(folder / "good.png")
    store = ImageStore("files", folder)
    assert store.check("alias.png") == "ok"
    np.testing.assert_array_equal(np.asarray(store.read("alias.png")), RGB)


def test_store_root_given_through_a_symlink(tmp_path, folder):
    # a root that is itself a symlink is resolved before the containment check
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    store = ImageStore("files", tmp_path / "alias")
    assert store.check("good.png") == "ok"
    assert store.check("../secret.png") == "escapes"


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_too_many_pixels(folder):
    (folder / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    assert ImageStore("files", folder).check("bomb.png") == "too_many_pixels"


def test_pixel_limit_refuses_from_the_header_before_decoding(folder, monkeypatch):
    # regression: a 13000 x 13000 (169 MP) image is below PIL's bomb limit and used to pass
    (folder / "huge.png").write_bytes(_bomb_png(13000, 13000))
    store = ImageStore("files", folder)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    assert store.check("huge.png", max_pixels=50_000_000) == "too_many_pixels"
    with pytest.raises(ImageError, match=r"13000x13000 = 169,000,000 pixels, above the limit of 50,000,000"):
        store.read("huge.png", max_pixels=50_000_000)
    assert (13000, 13000) not in decoded  # refused from the header: nothing was decoded
    assert store.check("good.png", max_pixels=12) == "ok" and store.check("good.png", max_pixels=11) == "too_many_pixels"


def test_pixel_limit_applies_to_lmdb_arrays(tmp_path):
    write_lmdb(tmp_path / "img.lmdb", {"a": RGB}, map_size=1 << 20)  # 4 x 3 = 12 pixels
    store = ImageStore("lmdb", tmp_path / "img.lmdb")
    assert store.check("a", max_pixels=12) == "ok"
    assert store.check("a", max_pixels=11) == "too_many_pixels"


# -- LMDB store
def _raw_lmdb(path: Path, entries: dict[str, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for k, v in entries.items():
            txn.put(k.encode(), v)
    env.close()
    return path


def test_write_lmdb_round_trips_raw_arrays(tmp_path):
    gray = np.array([[0, 50], [100, 255]], dtype=np.uint8)
    one_channel = np.array([[[1], [2], [3]]], dtype=np.uint8)  # (1, 3, 1)
    write_lmdb(tmp_path / "img.lmdb", {"a": RGB, "g": gray, "c": one_channel, 7: RGB[:1]}, map_size=1 << 20)
    store = ImageStore("lmdb", tmp_path / "img.lmdb")

    np.testing.assert_array_equal(np.asarray(store.read("a")), RGB)
    np.testing.assert_array_equal(np.asarray(store.read("g")), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(store.read("c")), np.repeat(one_channel, 3, axis=2))
    np.testing.assert_array_equal(np.asarray(store.read("7")), RGB[:1])  # keys are stored as strings
    assert all(store.check(k) == "ok" and store.exists(k) == "ok" for k in ("a", "g", "c", "7"))

    # the stored value is the NineRec/PMMRec layout: a pickled LMDB_Image with the raw bytes
    obj = pickle.loads(store.read_bytes("a"))
    assert isinstance(obj, LMDB_Image)
    assert (obj.id, obj.channels, tuple(obj.size)) == ("a", 3, (4, 3))
    assert obj.image == RGB.tobytes()
    np.testing.assert_array_equal(obj.get_image(), RGB)


def test_lmdb_missing_key_and_missing_database(tmp_path):
    write_lmdb(tmp_path / "img.lmdb", {"a": RGB}, map_size=1 << 20)
    store = ImageStore("lmdb", tmp_path / "img.lmdb")
    assert store.check("b") == "missing"
    assert store.exists("b") == "missing"
    assert _status_of(store, "b") == "missing"
    absent = ImageStore("lmdb", tmp_path / "absent.lmdb")
    assert absent.exists("a") == "missing"
    assert _status_of(absent, "a") == "missing"
    assert not (tmp_path / "absent.lmdb").exists()  # reading does not create an empty database


def test_lmdb_value_that_is_an_encoded_image_is_decoded(tmp_path):
    path = _raw_lmdb(tmp_path / "img.lmdb", {"png": _png(RGB), "junk": b"not an image at all"})
    store = ImageStore("lmdb", path)
    np.testing.assert_array_equal(np.asarray(store.read("png")), RGB)
    assert store.check("junk") == "not_an_image"
    assert store.exists("junk") == "ok"


def test_lmdb_image_pickled_in_another_module_is_rebuilt(tmp_path, monkeypatch):
    # NineRec/PMMRec pickled LMDB_Image from their own scripts (module __main__)
    class Foreign:
        pass

    Foreign.__module__, Foreign.__qualname__, Foreign.__name__ = "__main__", "LMDB_Image", "LMDB_Image"
    monkeypatch.setattr(sys.modules["__main__"], "LMDB_Image", Foreign, raising=False)
    obj = Foreign()
    obj.__dict__.update(channels=3, size=(4, 3), image=RGB.tobytes(), id="x")
    data = pickle.dumps(obj, protocol=4)
    assert b"__main__" in data
    monkeypatch.delattr(sys.modules["__main__"], "LMDB_Image")

    store = ImageStore("lmdb", _raw_lmdb(tmp_path / "img.lmdb", {"x": data}))
    np.testing.assert_array_equal(np.asarray(store.read("x")), RGB)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Evil(marker), protocol=4)
    assert data[:1] == b"\x80"
    assert b"system" in data  # the payload names os.system; pickle.loads would run it

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (os|posix)\.system"):
        _LmdbUnpickler(io.BytesIO(data)).load()
    assert not marker.exists()

    store = ImageStore("lmdb", _raw_lmdb(tmp_path / "img.lmdb", {"evil": data}))
    assert _status_of(store, "evil") == "unreadable"
    assert store.check("evil") == "unreadable"
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"image": b"\x00" * 36, "size": (4, 3), "channels": 3},  # a plain dict: no get_image
    [1, 2, 3],
    len,  # any global other than LMDB_Image is refused
])
def test_other_pickles_are_unreadable(tmp_path, payload):
    data = pickle.dumps(payload, protocol=4)
    store = ImageStore("lmdb", _raw_lmdb(tmp_path / "img.lmdb", {"k": data}))
    assert store.check("k") == "unreadable"


def test_lmdb_image_with_too_few_bytes_is_truncated(tmp_path):
    obj = LMDB_Image(RGB, "k")
    obj.size = (5, 5)  # the bytes do not fill a 5x5x3 array
    store = ImageStore("lmdb", _raw_lmdb(tmp_path / "img.lmdb", {"k": pickle.dumps(obj, protocol=4)}))
    assert store.check("k") == "truncated"
    with pytest.raises(ImageError, match=r"holds 36 bytes, a 5x5x3 array needs 75"):
        store.read("k")


def test_lmdb_rewritten_at_the_same_path_is_read_afresh(tmp_path):
    path = tmp_path / "img.lmdb"
    write_lmdb(path, {"a": RGB}, map_size=1 << 20)
    assert ImageStore("lmdb", path).check("a") == "ok"
    write_lmdb(path, {"b": RGB[::-1]}, map_size=1 << 20)
    store = ImageStore("lmdb", path)
    assert store.check("b") == "ok"
    assert store.check("a") == "missing"


def test_concurrent_first_open_of_an_lmdb_is_serialised(tmp_path, monkeypatch):
    # regression: two threads opening the same store raised "environment ... already open"
    import lmdb

    path = tmp_path / "img.lmdb"
    write_lmdb(path, {"a": RGB}, map_size=1 << 20)
    images._LMDB_ENVS.clear()
    real_open, opens = lmdb.open, []

    def slow_open(*args, **kwargs):  # widens the window between "not cached yet" and "cached"
        opens.append(args[0])
        time.sleep(0.2)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(lmdb, "open", slow_open)
    store, start, results = ImageStore("lmdb", path), threading.Barrier(4), []

    def worker():
        start.wait()
        try:
            results.append(store.check("a"))
        except Exception as exc:  # noqa: BLE001 - the failure this test guards against
            results.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * 4
    assert len(opens) == 1


@pytest.mark.parametrize("make", ["file", "folder"])
def test_a_path_that_is_not_an_lmdb_is_one_clear_error(tmp_path, make):
    # regression: lmdb.InvalidError traceback for a file or folder configured as an LMDB
    path = tmp_path / "images.lmdb"
    if make == "file":
        path.write_bytes(b"PK\x03\x04 a zip archive, not an LMDB" * 200)
    else:
        path.mkdir()
        (path / "0001.jpg").write_bytes(_png(RGB))
    store = ImageStore("lmdb", path)
    with pytest.raises(ImageStoreError, match=rf"{path}: configured as an LMDB image store, but"):
        store.verify()
    with pytest.raises(ImageStoreError):
        store.check("0001")
    assert isinstance(ImageStoreError("x"), ValueError)  # the CLI's exit 2 for bad input
