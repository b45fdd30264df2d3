"""The linear benchmark harness runs end to end on a tiny shape and writes well-formed outputs.

Structure only: speed targets are never unit tests (the host is shared and noisy).
"""

import json
import math

import pytest

from benchmarks import bench_linear, linear_rows
from benchmarks.common import cpu_kind, replace_marked_section, sqnr_db, upsert_marked_section

ROWS = "fp32 dense,bf16 dense [bf16],torchq int4 wo g128,torchq W8A8,aten _int_mm alone,broken"
TINY = ["--shapes", "64x128", "--m", "1,3", "--rows", ROWS, "--repeat", "2", "--budget", "0.01",
        "--flush-mib", "4", "--bw-mib", "16"]


def _broken(ctx, dtype):
    raise RuntimeError("no kernel for this on purpose")


@pytest.fixture()
def broken_row(monkeypatch):
    """A row that fails to prepare: it must be reported, never dropped."""
    monkeypatch.setattr(linear_rows, "ROWS", list(linear_rows.ROWS))
    linear_rows.register_row("broken peer", _broken)
    monkeypatch.setattr(bench_linear, "ROWS", linear_rows.ROWS)


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme") / "README.md"
    other = "<!-- bench_linear:other_cpu:start -->\nanother CPU's table\n<!-- bench_linear:other_cpu:end -->\n\n"
    path.write_text("# x\n\n## Benchmarks\n\n" + other + "<!-- bench_linear:tables-end -->\n\ntail\n")
    return path


def test_tiny_run_writes_table_json_plot_and_readme(tmp_path, readme, broken_row, capsys, monkeypatch):
    monkeypatch.setattr(bench_linear, "PLOT_COMMITTED", "bench_linear_{kind}.png")  # copy next to the temp README
    res = bench_linear.main(TINY + ["--threads", "1,2", "--out", str(tmp_path), "--readme", str(readme)])
    out = capsys.readouterr().out

    recs = res["records"]
    keys = {r["key"] for r in recs}
    assert keys == {"fp32 dense [fp32]", "bf16 dense [bf16]", "torchq int4 wo g128 [fp32]",
                    "torchq int4 wo g128 [bf16]", "torchq int4 wo g128 [fp32 high]",
                    "torchq int4 wo g128 oneDNN route [bf16]", "torchq int4 wo g128 oneDNN route [fp32 high]",
                    "torchq W8A8 [fp32]", "torchq W8A8 [bf16]",
                    "aten _int_mm alone [int8]", "broken peer [bf16]"}
    assert len(recs) == len(keys) * 2 * 2  # rows x M x threads
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == (len(keys) - 1) * 4
    for r in ok:
        assert r["ms"] > 0 and r["samples_ms"] and r["gbps"] > 0 and 0 < r["roofline_frac"]
        assert r["weight_bytes"] > 0 and r["kernel"] and r["speedup_vs_bf16"] > 0
    by = {(r["key"], r["m"], r["threads"]): r for r in recs}
    assert by[("bf16 dense [bf16]", 1, 2)]["speedup_vs_bf16"] == pytest.approx(1.0)
    assert math.isinf(by[("fp32 dense [fp32]", 3, 1)]["sqnr_db"])  # it is the reference
    assert 15 < by[("torchq int4 wo g128 [fp32]", 3, 2)]["sqnr_db"] < 30
    assert by[("torchq W8A8 [bf16]", 1, 1)]["sqnr_db"] > 30
    for route in ("torchq int4 wo g128 [fp32 high]", "torchq int4 wo g128 oneDNN route [fp32 high]"):
        assert 15 < by[(route, 3, 2)]["sqnr_db"] < 30
    assert by[("fp32 dense [fp32]", 1, 1)]["weight_bytes"] == 64 * 128 * 4
    assert 64 * 128 // 2 < by[("torchq int4 wo g128 [bf16]", 1, 2)]["weight_bytes"] < 64 * 128  # codes + scales
    assert res["not_run"] == {"broken peer [bf16]": "RuntimeError: no kernel for this on purpose"}
    assert res["bandwidth"]["gbps_median"] > 0 and len(res["bandwidth"]["samples_gbps"]) == 2

    # markdown: a table per shape and thread count with one line per row, the scaling table, the failure
    assert "#### 64x128 (N x K), 1 thread\n" in out and "#### 64x128 (N x K), 2 threads\n" in out
    assert "Thread scaling 64x128" in out and "- broken peer [bf16]: RuntimeError" in out
    header = "| row | act | kernel | MB | SQNR dB | M=1 ms | M=1 GB/s | M=1 % roof | M=3 ms | note |"
    assert out.count(header) == 2
    table = out.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    assert len(table) == len(keys) and all(line.count("|") == 11 for line in table)

    data = json.loads((tmp_path / "bench_linear.json").read_text(), parse_constant=pytest.fail)
    assert data["records"][0].keys() >= {"shape", "m", "threads", "row", "act", "kernel", "ms", "gbps",
                                         "roofline_frac", "sqnr_db", "speedup_vs_bf16", "status"}
    assert (tmp_path / "bench_linear.png").stat().st_size > 10_000
    assert (tmp_path / "bench_linear_full.md").read_text().count("\n| 64x128 |") == len(recs)

    # re-rendering from the JSON reproduces the table without measuring anything
    again = bench_linear.main(["--from-json", str(tmp_path / "bench_linear.json"), "--out", str(tmp_path / "re"), "--no-plot"])
    assert bench_linear.render_markdown(again) == bench_linear.render_markdown(res)

    # this CPU kind's section is added before the anchor; another CPU's table stays as it was
    kind, title = cpu_kind(res["machine"])
    assert kind in ("amx", "avx512", "avx2", "scalar")
    text = readme.read_text()
    assert "another CPU's table" in text and text.endswith("<!-- bench_linear:tables-end -->\n\ntail\n")
    assert text.index("other_cpu:end") < text.index(f"<!-- bench_linear:{kind}:start -->") < text.index("tables-end")
    assert f"#### {title}: " in text and f"torchq kernel path {res['machine']['torchq_path']}" in text
    results = (readme.parent / "benchmarks" / "RESULTS.md").read_text()
    assert f"<!-- bench_linear:{kind}:start -->" in results and "64x128 (N x K), 1 thread" in results
    assert f"![linear latency relative to bf16 dense](bench_linear_{kind}.png)" in results
    assert (readme.parent / f"bench_linear_{kind}.png").exists()
    # a second run replaces its own section, nothing else
    bench_linear.update_readme(res, str(readme), None)
    again_text = readme.read_text()
    assert again_text.count(f"<!-- bench_linear:{kind}:start -->") == 1 and "another CPU's table" in again_text


def test_slow_cells_are_skipped_with_a_reason(tmp_path):
    res = bench_linear.run(bench_linear.parse_args(
        TINY[:4] + ["--rows", "fp32 dense", "--max-call-s", "0", "--bw-mib", "16", "--flush-mib", "4",
                    "--out", str(tmp_path)]))
    first, second = res["records"]
    assert first["status"] == "ok" and second["status"] == "skipped"
    assert "predicted" in second["note"] and second["ms"] is None


def test_readme_markers_must_exist():
    assert replace_marked_section("a<!-- s:start -->b<!-- s:end -->c", "s", "X") == "a<!-- s:start -->\nX\n<!-- s:end -->c"
    with pytest.raises(ValueError, match="markers"):
        replace_marked_section("no markers here", "s", "X")
    assert upsert_marked_section("a\n<!-- end -->", "k", "X", "<!-- end -->") == "a\n<!-- k:start -->\nX\n<!-- k:end -->\n\n<!-- end -->"
    with pytest.raises(ValueError, match="anchor"):
        upsert_marked_section("no anchor", "k", "X", "<!-- end -->")


def test_sqnr_and_bad_cli():
    import torch

    x = torch.ones(10)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x * 1.1, x) == pytest.approx(20.0)
    with pytest.raises(SystemExit):
        bench_linear.parse_args(["--shapes", "64by128"])
    with pytest.raises(SystemExit):
        bench_linear.select_rows("no such row")
