"""Atomic writes: a writer killed mid-write leaves a temporary path that the next write removes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmrec import io as mio
from mmrec.io import atomic_dir, atomic_file, clean_stale
from tests.conftest import REPO

KILLED_WRITER = """
import os, signal, sys
from mmrec.io import atomic_dir, atomic_file
kind, target = sys.argv[1], sys.argv[2]
# a SIGTERM ignored by whoever started the test run is inherited through exec (seen under a
# `nohup`-started `make test`: SigIgn had SIGTERM set): this writer must die of it like a normal one
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
if kind == "dir":
    with atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGTERM)  # default action: the process ends, no cleanup code runs
else:
    with atomic_file(target, "w") as fh:
        fh.write("half")
        fh.flush()
        os.kill(os.getpid(), signal.SIGTERM)
"""


def _killed_write(kind: str, target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_later_write_removes_what_a_killed_writer_left(tmp_path, kind):
    # regression: a SIGTERM during a write left `.<name>.tmp-*` that no later run cleaned up
    target = tmp_path / ("out" if kind == "dir" else "out.json")
    _killed_write(kind, target)
    (left,) = _leftovers(tmp_path)
    assert left.startswith(f".{target.name}.tmp-")
    assert not target.exists()
    if kind == "dir":
        with atomic_dir(target) as tmp:
            (tmp / "done").write_text("ok")
    else:
        with atomic_file(target, "w") as fh:
            fh.write("ok")
    assert _leftovers(tmp_path) == []
    assert target.exists()


def test_a_running_writer_keeps_its_temporary_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as mine:  # this process: alive
        # another live process of this host writing the same target
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            theirs = tmp_path / f".out.tmp-{sleeper.pid}@{mio._HOST}.abcd1234"
            theirs.mkdir()
            elsewhere = tmp_path / ".out.tmp-1@another-host.abcd1234"  # pids of other hosts mean nothing here
            elsewhere.mkdir()
            assert clean_stale(target) == []
            assert mine.is_dir() and theirs.is_dir() and elsewhere.is_dir()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert clean_stale(target) == [theirs]  # its writer is gone now
    assert elsewhere.is_dir()


def test_temporary_paths_without_an_owner_go_once_untouched_for_an_hour(tmp_path):
    target = tmp_path / "out"
    recent, old = tmp_path / ".out.tmp-k2j4h5g6", tmp_path / ".out.tmp-partial"
    recent.mkdir()
    old.mkdir()
    past = time.time() - mio.LEGACY_STALE_S - 60
    os.utime(old, (past, past))
    other = tmp_path / ".output.tmp-partial"  # another target's: not ours to judge
    other.mkdir()
    os.utime(other, (past, past))
    assert clean_stale(target) == [old]
    assert recent.is_dir() and other.is_dir()


def test_a_writer_killed_between_its_renames_gets_its_previous_version_back(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target.rename(tmp_path / f".out.old-{pid}@{mio._HOST}")
    clean_stale(target)
    assert (target / "v").read_text() == "1" and _leftovers(tmp_path) == []
