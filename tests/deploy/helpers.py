"""Shared by the deploy tests: a tiny exported model and a real `python -m deploy.serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import torch

from mmrec.export import export_model
from mmrec.models.recommender import Recommender
from tests.conftest import REPO
from tests.models.test_recommender import SEQ, config
from tests.models.test_towers import N, raw_content

IDS = [f"it{i}" for i in range(1, N + 1)]
IT1_TEXT = "item number 1 with words x "
"""The text of catalog item it1 (text-only in ``raw_content``): an item with this text gets it1's vector."""


def tiny_export(out: Path, popularity: bool = True, seed: int = 0) -> Path:
    """A tiny fused model (random-init text and image encoders) exported as a model folder."""
    torch.manual_seed(seed)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": IDS})
    counts = None
    if popularity:
        counts = torch.zeros(N + 1, dtype=torch.int64)
        counts[[5, 9, 2]] = torch.tensor([7, 4, 1])
    return export_model(model, out, item_map, "shop", {"stage": "test"}, popularity=counts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m deploy.serve ARGS --port <free>` on loopback, in its own process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "deploy.serve", *args, "--port", str(self.port)],
                                         cwd=REPO, env=env or dict(os.environ), stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _ = self.call("GET", "/ready", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def call(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, parsed JSON body) of one request; ``body`` is JSON-encoded unless bytes."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
