"""Resident memory of a CPU training process: hand freed heap memory back to the operating system.

A CPU training step allocates and frees tensors of many sizes (the unique items of a batch differ
from batch to batch). glibc's allocator serves the ones under its mmap threshold from the process
heap, and that threshold rises (up to 32 MiB on 64-bit) every time a larger block is freed; memory
freed inside the heap stays resident until ``malloc_trim`` returns it, because a block still in use
near the top of the heap keeps the heap from shrinking. On this project's real-data runs
(configs/amazon.yaml on the 2-core VM) resident memory grew steadily over an hour to 5-6.5 GB a run,
and ``malloc_trim(0)`` called into a running one (with gdb) cut its anonymous memory from 3.1 to
0.9 GB at once. The trainer (``mmrec.training.train``, ``TrainConfig.release_memory``) calls
``release_freed_memory`` every ``log_every`` steps and after each evaluation;
``benchmarks/bench_memory.py`` (`make bench-memory`) measures a fine-tuning run with and without it.

Only glibc has ``malloc_trim``; on other C libraries (macOS, musl) ``release_freed_memory`` does
nothing and says so by returning ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _malloc_trim():
    """glibc's ``int malloc_trim(size_t pad)``, or ``None`` where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_freed_memory() -> bool | None:
    """Return the heap memory the allocator holds free to the operating system (glibc ``malloc_trim(0)``).

    ``True`` when some memory was returned, ``False`` when there was none to return, ``None`` when
    this C library has no ``malloc_trim`` (nothing is done). Live objects are never touched."""
    fn = _malloc_trim()
    if fn is None:
        return None
    return bool(fn(0))


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (``/proc/self/statm``); ``None`` where there is no ``/proc``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
