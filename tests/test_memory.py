"""mmrec.memory: freed heap memory goes back to the operating system; resident memory is read right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmrec.memory import _malloc_trim, release_freed_memory, resident_bytes
from tests.conftest import REPO

# In a fresh interpreter: 2000 blocks of 64 KiB (below glibc's mmap threshold, so on the heap), one
# small block allocated after them (it keeps the heap from shrinking when they are freed, as a live
# tensor does in training), then the blocks freed: the memory stays resident until it is released.
FRAGMENT = """
import json
from mmrec.memory import release_freed_memory, resident_bytes
release_freed_memory()
base = resident_bytes()
blocks = [bytearray(64 << 10) for _ in range(2000)]
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])  # touch every page
pin = bytearray(1024)
grown = resident_bytes()
del blocks
freed = resident_bytes()
released = release_freed_memory()
after = resident_bytes()
print(json.dumps({"base": base, "grown": grown, "freed": freed, "after": after, "released": released}))
"""


@pytest.mark.skipif(resident_bytes() is None, reason="no /proc on this system")
def test_resident_bytes_follows_allocations():
    before = resident_bytes()
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])
    assert resident_bytes() - before > 48 << 20
    del block


@pytest.mark.skipif(_malloc_trim() is None, reason="this C library has no malloc_trim")
def test_freed_heap_memory_stays_resident_until_released():
    proc = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, cwd=REPO, check=True)
    m = json.loads(proc.stdout)
    mib = 1 << 20
    assert m["grown"] - m["base"] > 100 * mib  # 125 MiB of blocks became resident
    assert m["freed"] - m["base"] > 100 * mib  # freeing them alone returned (almost) nothing
    assert m["released"] is True
    assert m["freed"] - m["after"] > 100 * mib  # released: back near the start
    assert m["after"] - m["base"] < 25 * mib


@pytest.mark.skipif(_malloc_trim() is None, reason="this C library has no malloc_trim")
def test_release_keeps_live_objects():
    kept = bytearray(b"abc" * 100_000)
    garbage = [bytearray(32 << 10) for _ in range(100)]
    del garbage
    assert isinstance(release_freed_memory(), bool)
    assert kept == bytearray(b"abc" * 100_000)


def test_without_malloc_trim_nothing_is_done(monkeypatch):
    import mmrec.memory as memory

    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is None
