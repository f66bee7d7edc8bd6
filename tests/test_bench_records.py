"""benchmarks/bench.py (`make bench`) and benchmarks/bench_serving.py (`make bench-serve`) write one
JSON record per run, holding every table as printed with the command, commit, load averages and
machine; experiments/report.py renders those records into docs/RESULTS.md's Benchmarks section.
No real benchmark runs here: the model and catalog benchmarks are stand-ins, the serving one a toy size."""

from __future__ import annotations

import json
import sys

import pytest

from experiments import report
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402
import bench_catalog  # noqa: E402
import bench_model  # noqa: E402
import bench_serving  # noqa: E402

CATALOG_ROW = {"domain": "amazon_instrument", "items": 900, "interactions": 12000, "images": 850,
               "kept_interactions": 11000, "import_s": 1.234, "validation_s": 2.5, "gx_import_s": 0.75,
               "preprocess_s": 0.166, "total_s": 4.0, "peak_rss_mb": 512.4, "wall_s": 6.125}


def _fake_model_main(argv):
    """bench_model.main's stand-in: prints one table through bench_model.table, as its sections do."""
    bench_model.table("model FLOP utilisation: stand-in", bench_model.MFU_HEAD,
                      [("cpu", "fp32", 4, 2, "0.123", "32.5", "1.50", "12.20", "95.0", "12.84", "7.001")],
                      ["a note about the peak"])
    return {"threads": 1, "mfu": [{"device": "cpu", "s_per_step": 0.1234}]}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    records = tmp_path / "docs" / "results" / "bench"
    monkeypatch.setattr(bench, "RECORDS", records)
    monkeypatch.setattr(bench_catalog, "main", lambda argv: [dict(CATALOG_ROW)])
    monkeypatch.setattr(bench_model, "main", _fake_model_main)
    return records


def test_quick_make_bench_writes_no_record_unless_asked(stand_ins, tmp_path, capsys):
    printed = bench_model.table
    bench.main(["--quick", "--threads", "1"])
    assert not stand_ins.exists()
    assert "(record:" not in capsys.readouterr().out
    bench.main(["--threads", "1", "--records", ""])
    assert not stand_ins.exists()
    assert bench_model.table is printed  # the capture is undone
    # a --quick run writes only where told, under its own name (never over the full-size record)
    bench.main(["--quick", "--threads", "1", "--records", str(tmp_path / "toy")])
    assert [p.name for p in (tmp_path / "toy").iterdir()] == ["bench-quick.json"]
    assert json.loads((tmp_path / "toy" / "bench-quick.json").read_text())["quick"] is True


def test_make_bench_record_holds_the_printed_tables_and_reaches_the_results_page(stand_ins, tmp_path, capsys):
    bench.main(["--threads", "1"])
    out = capsys.readouterr().out
    path = stand_ins / "bench.json"
    assert out.rstrip().splitlines()[-1] == f"(record: {path})"  # outside the repository: the full path
    rec = json.loads(path.read_text())
    assert rec["script"] == "benchmarks/bench.py" and rec["command"].endswith("benchmarks/bench.py --threads 1")
    assert rec["argv"] == ["--threads", "1"] and rec["threads"] == 1 and rec["quick"] is False
    assert len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool)
    assert rec["time_utc"].endswith("+00:00") and len(rec["load_average_start"]) == len(rec["load_average_end"]) == 3
    assert rec["torch"] and rec["cpu"]["cores"] >= 1 and rec["cpu"]["model"] and "gpu" in rec
    catalog, mfu = rec["tables"]
    assert catalog["columns"] == list(bench.bench_catalog.HEAD)
    assert catalog["rows"] == [["amazon_instrument", "900", "850", "12000", "1.23", "2.50", "0.75", "0.17", "6.12", "64%", "512"]]
    assert mfu["columns"] == list(bench_model.MFU_HEAD) and mfu["notes"] == ["a note about the peak"]
    assert mfu["rows"] == [["cpu", "fp32", "4", "2", "0.123", "32.5", "1.50", "12.20", "95.0", "12.84", "7.001"]]
    for cell in mfu["rows"][0]:  # what the record holds is what was printed
        assert cell in out
    assert rec["results"]["catalog"][0]["import_s"] == 1.234  # full precision beside the printed cells

    text = report.write_report(tmp_path / "docs", []).read_text()
    part = text[text.index("## Benchmarks"):]
    assert "### `bench.json`" in part and f"commit {rec['commit'][:10]}" in part
    assert f"`{rec['command']}`" in part and rec["time_utc"] in part
    assert "| amazon_instrument | 900 | 850 | 12000 | 1.23 | 2.50 | 0.75 | 0.17 | 6.12 | 64% | 512 |" in part
    assert "| cpu | fp32 | 4 | 2 | 0.123 | 32.5 | 1.50 | 12.20 | 95.0 | 12.84 | 7.001 |" in part
    assert "**model FLOP utilisation: stand-in**" in part and "a note about the peak" in part
    assert "No record of `benchmarks/bench_serving.py` yet: `make bench-serve`" in part
    assert "No record of `benchmarks/bench.py`" not in part


def test_serving_record_renders_its_figures(tmp_path):
    start = bench.new_record("benchmarks/bench_serving.py", ["--only", "recommend,http"])
    tables = [bench.table("ExportedModel.recommend, 100,000 items", ("case", "implementation", "median ms", "p99 ms", "calls"),
                          [("1 user, k=10", "after", "2.56", "4.13", 200), ("64 users, k=100", "after", "48.20", "61.02", 9)],
                          load=[0.61, 0.5, 0.4]),
              bench.table("HTTP service on loopback", ("items", "clients", "p50 ms", "p99 ms", "req/s", "errors"),
                          [("10,000", 4, "3.10", "9.87", "1234", 0)])]
    path = bench_serving.write_record(tmp_path / "docs" / "results" / "bench", ["recommend", "http"], start, tables)
    assert path.name == "bench_serving-recommend-http.json"
    rec = json.loads(path.read_text())
    assert rec["sections"] == ["recommend", "http"] and rec["threads"] == 1 and rec["gpu"] is None
    assert rec["tables"][0]["rows"][0] == ["1 user, k=10", "after", "2.56", "4.13", "200"]

    text = report.write_report(tmp_path / "docs", []).read_text()
    part = text[text.index("## Benchmarks"):]
    assert "### `bench_serving-recommend-http.json`" in part and "--only recommend,http`" in part
    assert "| 1 user, k=10 | after | 2.56 | 4.13 | 200 |" in part
    assert "| 64 users, k=100 | after | 48.20 | 61.02 | 9 |" in part
    assert "| 10,000 | 4 | 3.10 | 9.87 | 1234 | 0 |" in part
    assert "load average 0.61 0.50 0.40 when printed" in part
    assert "No record of `benchmarks/bench.py` yet: `make bench`" in part


def test_results_page_names_the_commands_when_no_benchmark_has_a_record(tmp_path):
    text = report.write_report(tmp_path / "docs", []).read_text()
    part = text[text.index("## Benchmarks"):]
    assert "`make bench` (`.venv/bin/python benchmarks/bench.py`) writes `" in part
    assert "`make bench-serve` (`.venv/bin/python benchmarks/bench_serving.py`) writes `" in part


def test_serving_toy_run_records_what_it_printed(tmp_path, capsys):
    """The recommend section end to end at a toy size into a temporary folder."""
    assert bench_serving.main(["--only", "recommend", "--items", "300", "--reps", "80", "--records", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "bench_serving-recommend.json").read_text())
    (table,) = rec["tables"]
    assert table["columns"] == ["case", "implementation", "median ms", "p99 ms", "calls"]
    assert [r[:2] for r in table["rows"]] == [["1 user, k=10", "before"], ["1 user, k=10", "after"],
                                              ["1 user, k=10", "q @ E.T + topk only"], ["64 users, k=100", "before"],
                                              ["64 users, k=100", "after"]]
    printed = [line.split() for line in out.splitlines()]
    for row in table["rows"]:  # the printed line ends with the recorded median, p99 and calls
        assert row[2:] in [words[-3:] for words in printed]
    assert out.rstrip().endswith(f"(record: {tmp_path / 'bench_serving-recommend.json'})")
    with pytest.raises(SystemExit):
        bench_serving.main(["--only", "recomend", "--records", ""])


def test_fresh_clone_times_each_make_target_of_a_clone_and_records_it(tmp_path):
    """benchmarks/fresh_clone.py on a throwaway repository whose `make install` builds a real venv."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Makefile").write_text(f"install:\n\t{sys.executable} -m venv .venv\n"
                                   "demo:\n\ttest -d .venv && echo demo-ran > demo.txt\n")
    for cmd in (["init", "-q"], ["add", "Makefile"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    records, work = tmp_path / "records", tmp_path / "work"
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fresh_clone.py"), "--repo", str(repo), "--workdir", str(work),
                          "--records", str(records), "--keep"], capture_output=True, text=True, check=True).stdout
    assert (work / "mmrec" / "demo.txt").read_text().strip() == "demo-ran"
    rec = json.loads((records / "fresh_clone.json").read_text())
    assert rec["results"]["install"]["rc"] == rec["results"]["demo"]["rc"] == 0
    assert rec["results"]["venv"]["bytes"] > 1e6 and rec["results"]["venv"]["pip_check_rc"] == 0
    assert len(rec["cloned"]["commit"]) == 40
    rows = rec["tables"][0]["rows"]
    assert [r[0] for r in rows] == ["make install", "make demo", "venv size, `pip check`"]
    assert [r[2] for r in rows] == ["ok", "ok", "clean"] and "make install:" in out
    page = report.write_report(tmp_path / "docs", [], bench=records).read_text()
    assert "### `fresh_clone.json`" in page and "| make demo |" in page


def test_fresh_clone_stops_at_a_failing_target(tmp_path):
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Makefile").write_text("install:\n\texit 3\ndemo:\n\ttouch demo.txt\n")
    for cmd in (["init", "-q"], ["add", "Makefile"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    records = tmp_path / "records"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "fresh_clone.py"), "--repo", str(repo), "--workdir", str(tmp_path / "w"),
                    "--records", str(records), "--keep"], capture_output=True, text=True, check=True)
    rec = json.loads((records / "fresh_clone.json").read_text())
    assert rec["results"]["install"]["rc"] != 0 and "demo" not in rec["results"]
    assert rec["tables"][0]["rows"][0][2].startswith("FAILED") and not (tmp_path / "w" / "mmrec" / "demo.txt").exists()
