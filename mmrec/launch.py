"""The ``torchrun`` command line for ``mmrec <stage> --nproc N``, without importing torch (the CLI
starts fast). What runs under it is in ``mmrec.distributed``."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(nproc: int, module_args: Sequence[str], python: str | None = None) -> list[str]:
    """The ``torchrun`` command line that runs ``python -m <module_args>`` on ``nproc`` local
    processes (``--standalone``: one node, a free port chosen by the rendezvous)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", *module_args]


def launch(nproc: int, module_args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``python -m <module_args>`` under torchrun with ``nproc`` processes; returns its exit code.
    Each process uses one CPU thread unless ``OMP_NUM_THREADS`` says otherwise."""
    cmd = torchrun_command(nproc, module_args)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    print(f"launching: {shlex.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=full_env)
