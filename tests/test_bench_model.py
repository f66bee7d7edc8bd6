"""benchmarks/bench.py (`make bench`) and the MFU pieces of benchmarks/bench_model.py: FLOPs counted
as analytic formulas say (the CPU's fused attention kernel included), a positive matmul peak, and
the quick run printing every table with finite figures (MFU within (0, 100) %)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, SHARED

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_model  # noqa: E402


def test_flop_counter_counts_linear_and_the_cpu_attention_kernel():
    b, h, s, d, n_in, n_out = 2, 2, 5, 8, 16, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b * s, n_in, generator=g, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=g, requires_grad=True)
    q, k, v = (torch.randn(b, h, s, d, generator=g, requires_grad=True) for _ in range(3))
    with bench_model.flop_counter() as counter:
        out = F.linear(x, w).sum() + F.scaled_dot_product_attention(q, k, v).sum()
        out.backward()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    linear = 3 * 2 * (b * s) * n_in * n_out  # forward, grad of input, grad of weight
    # forward: QK^T and AV; backward (torch's flash-kernel formula): the scores recomputed + 4 products
    attention = (2 + 5) * (2 * b * h * s * s * d)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops  # the kernel torch's own table lacks
    assert counter.get_total_flops() == linear + attention


def test_matmul_peak_is_a_positive_rate_of_a_named_kernel():
    peak = bench_model.matmul_peak(torch.device("cpu"), torch.float32, max_n=512, seconds=0.02)
    assert math.isfinite(peak["gflops"]) and peak["gflops"] > 0
    name, size = peak["kernel"].split()
    assert name in ("mm", "linear") and size in ("256x256", "512x512")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets not present")
def test_quick_make_bench_prints_every_table_with_finite_figures(tmp_path):
    out_json = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--threads", "1", "--json", str(out_json)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    res = json.loads(out_json.read_text())
    finite_pos = lambda v: isinstance(v, float | int) and math.isfinite(v) and v > 0  # noqa: E731

    # catalog table
    (cat,) = res["catalog"]
    assert cat["domain"] == "amazon_instrument" and cat["items"] > 0 and finite_pos(cat["wall_s"])
    model = res["model"]
    # matmul peaks measured in this run, fp32 and bf16
    assert set(model["peak"]) >= {"cpu float32", "cpu bfloat16"}
    assert all(finite_pos(p["gflops"]) for p in model["peak"].values())
    # MFU table: fp32 and bf16 rows on the CPU; top-2 table: the CPU fp32 row
    assert [(r["device"], r["precision"]) for r in model["mfu"] if r["device"] == "cpu"] == [("cpu", "fp32"), ("cpu", "bf16 autocast")]
    assert ("cpu", "fp32") in [(r["device"], r["precision"]) for r in model["top2"]]
    for r in model["mfu"] + model["top2"]:
        for key in ("s_per_step", "sequences_per_s", "gflop_per_step", "achieved_gflops", "peak_gflops", "mfu_pct", "mean_loss"):
            assert finite_pos(r[key]), (key, r)
        assert 0 < r["mfu_pct"] < 100, r
        assert r["achieved_gflops"] == pytest.approx(r["gflop_per_step"] / r["s_per_step"])
        assert r["mfu_pct"] == pytest.approx(100 * r["achieved_gflops"] / r["peak_gflops"])
        dtype = "bfloat16" if r["precision"].startswith("bf16") else "float32"
        assert r["peak_gflops"] == model["peak"][f"{r['device']} {dtype}"]["gflops"]
    # the end-to-end model does more work per item than the cached one
    assert model["top2"][0]["gflop_per_step"] / model["top2"][0]["batch"] > model["mfu"][0]["gflop_per_step"] / model["mfu"][0]["batch"]
    # feature cache vs sentence-transformers, evaluation throughput
    assert [r["run"].split(",")[0] for r in model["text"]] == ["mmrec text_features"] * 2 + ["sentence-transformers encode"] * 2
    assert all(finite_pos(r["items_per_s"]) for r in model["text"])
    assert all(finite_pos(r["users_per_s"]) for r in model["eval"] if r["users_per_s"] is not None)
    # every table printed with the load average; the GPU row says whether there is one
    tables = out.count("\n## ")
    assert tables == 4 and out.count("when this table was printed") == tables
    assert "load average" in out.split("\n## ")[0]  # the catalog table's
    if torch.cuda.is_available():
        assert any(r["device"].startswith("cuda") for r in model["top2"])
    else:
        assert "no GPU present" in out and model["gpu"] is None
