"""`glorocert compare-local`: gloro, BCP, KW and the cascade on the same samples, each in a fresh process.

Small models on sklearn's 8×8 digits. A spawned child costs seconds (it imports torch and loads the
model), so most tests run the methods in-process (``run_here``, the same code minus the process) and
two check the real isolation: results, memory and "unsupported" rows through the pipe, and a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import helpers
from glorocert import cli, render
from glorocert.api import certify, load
from glorocert.studies import compare_local, isolation


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return helpers.run_main(monkeypatch, capsys, *args, width=250)


def rows_by_method(report: dict) -> dict:
    return {row["method"]: row for row in report["methods"]}


def test_report_on_a_relu_model_has_every_method_on_the_same_samples(trained_digits_model, monkeypatch, capsys, tmp_path):
    _, onnx_path, _ = trained_digits_model
    monkeypatch.setattr(compare_local, "run_isolated", lambda target, argument: isolation.run_here(target, argument))
    report_path = tmp_path / "report.json"
    code, out, err = run_main(monkeypatch, capsys, "compare-local", onnx_path, "--data", "digits", "--limit", "40",
                              "--eps", "0.1,0.2", "--kw-limit", "10", "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["format"] == "glorocert-compare-local" and report["eps"] == [0.1, 0.2]
    rows = rows_by_method(report)
    assert list(rows) == ["gloro", "bcp", "kw", "cascade"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert [rows[m]["samples"] for m in ("gloro", "bcp", "cascade")] == [40, 40, 40]
    assert rows["kw"]["samples"] == 10 and report["kw_samples"] == 10
    for row in rows.values():
        assert row["seconds"] > 0 and row["seconds_per_sample"] == pytest.approx(row["seconds"] / row["samples"])
        assert set(row["vra"]) == {"0.1", "0.2"} and 0 <= row["clean_accuracy"] <= 1
    assert rows["gloro"]["time_ratio_vs_gloro"] == pytest.approx(1.0)
    for key in ("0.1", "0.2"):
        assert rows["cascade"]["vra"][key] >= rows["gloro"]["vra"][key]
        assert rows["bcp"]["vra"][key] >= rows["gloro"]["vra"][key]  # BCP is never looser than the global bound
    assert sum(rows["cascade"]["local"]["rescued"].values()) > 0
    # the children compute what the library computes in this process
    here = certify(load(onnx_path), compare_local.Source(str(onnx_path), data="digits", limit=40).open(load(onnx_path)), [0.1, 0.2])
    assert rows["gloro"]["vra"] == pytest.approx(here.summary["vra"])
    assert rows["gloro"]["clean_accuracy"] == pytest.approx(here.summary["clean_accuracy"])
    text = " ".join(out.split())
    assert "cascade (bcp)" in text and "VRA ε=0.2" in text and "first 10 samples only (--kw-limit 10)" in text


def test_in_fresh_processes_a_minmax_model_gets_an_unsupported_kw_row_and_exit_code_0(saved_model, monkeypatch, capsys, tmp_path):
    _, path = saved_model("minmax_halves")
    report_path = tmp_path / "report.json"
    code, out, err = run_main(monkeypatch, capsys, "compare-local", path, "--data", "digits", "--limit", "30",
                              "--methods", "gloro,kw", "--json", report_path)
    assert code == 0, err
    rows = rows_by_method(json.loads(report_path.read_text()))
    assert rows["gloro"]["status"] == "ok" and rows["gloro"]["samples"] == 30
    assert rows["gloro"]["peak_rss_bytes"] >= rows["gloro"]["load_rss_bytes"] > 0  # the child's own memory
    assert rows["kw"]["status"] == "unsupported" and "ReLU" in rows["kw"]["error"] and rows["kw"]["peak_rss_bytes"] > 0
    assert "unsupported" in out and "Traceback" not in out + err


def test_bcp_and_the_cascade_on_a_minmax_model_are_unsupported_rows_not_failures(saved_model):
    _, path = saved_model("minmax_halves")
    report = compare_local.compare_local(compare_local.Source(str(path), data="digits", limit=30), [0.05],
                                         methods="gloro,bcp,cascade", isolate=False)
    rows = rows_by_method(report)
    assert rows["gloro"]["status"] == "ok" and compare_local.succeeded(report)
    for method in ("bcp", "cascade"):  # the cascade runs BCP on gloro's ⊥ samples
        assert rows[method]["status"] == "unsupported" and "MinMax" in rows[method]["error"]


def test_a_crashed_child_is_reported_with_its_exit_code():
    result = isolation.run_isolated(os._exit, 3)
    assert result["status"] == "crashed" and "exit code 3" in result["error"]


def test_rows_that_did_not_run_keep_the_table_and_exit_code_sensible():
    report = {"eps": [0.3], "model": "m.onnx", "dataset": "d", "samples": 5, "kw_limit": 100, "fallback": "bcp",
              "methods": [
                  {"method": "gloro", "status": "ok", "samples": 5, "clean_accuracy": 1.0, "vra": {"0.3": 0.8}, "seconds": 0.1,
                   "seconds_per_sample": 0.02, "time_ratio_vs_gloro": 1.0, "peak_rss_bytes": 2**28, "load_rss_bytes": 2**27},
                  {"method": "kw", "status": "crashed", "samples": 5, "error": "the child process died without a result (killed by signal 9)",
                   "peak_rss_bytes": None},
              ]}
    assert compare_local.succeeded(report)
    report["methods"][0]["status"] = "failed"
    assert not compare_local.succeeded(report)
    console = Console(width=250, record=True)
    console.print(render.compare_local_table(report))
    text = " ".join(console.export_text().split())
    assert "crashed" in text and "signal 9" in text


BAD = {
    "unknown_method": (["--methods", "gloro,lp"], "--methods"),
    "no_method": (["--methods", ","], "--methods"),
    "negative_eps": (["--eps", "-0.1"], "--eps"),
    "text_eps": (["--eps", "big"], "--eps"),
    "negative_kw_limit": (["--kw-limit", "-1"], "--kw-limit"),
    "bad_fallback": (["--fallback", "lp"], "--fallback"),
    "bad_json_extension": (["--json", "{out}/report.txt"], ".txt"),
    "wrong_data_shape": (["--data", "mnist-5k"], "shape"),
    "missing_model": (["--model-path", "{out}/absent.onnx"], ""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(trained_digits_model, monkeypatch, capsys, tmp_path, case):
    _, onnx_path, _ = trained_digits_model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    extra, words = BAD[case]
    extra = [a.replace("{out}", str(out_dir)) for a in extra]
    if extra[0] == "--model-path":
        onnx_path, extra = extra[1], []
    args = ["compare-local", onnx_path, "--data", "digits", "--limit", "10", *extra]
    if "--json" not in extra:
        args += ["--json", out_dir / "report.json"]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert "Traceback" not in out + err
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_during_a_method_exits_130_and_writes_no_report(trained_digits_model, monkeypatch, capsys, tmp_path):
    _, onnx_path, _ = trained_digits_model
    calls = []

    def interrupted(target, argument, **kwargs):
        calls.append(argument.method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"status": "ok", "samples": 10, "clean_accuracy": 1.0, "vra": {"0.3": 1.0}, "seconds": 0.1,
                "peak_rss_bytes": 1, "load_rss_bytes": 1}

    monkeypatch.setattr(compare_local, "run_isolated", interrupted)
    code, _, _ = run_main(monkeypatch, capsys, "compare-local", onnx_path, "--data", "digits", "--limit", "10",
                          "--json", tmp_path / "report.json")
    assert code == 130 and calls == ["gloro", "bcp"]
    assert not any(tmp_path.iterdir())


def test_help_has_an_example():
    result = CliRunner().invoke(cli.app, ["compare-local", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "glorocert compare-local " in result.stdout and "--kw-limit" in result.stdout


def test_parse_methods_keeps_order_and_drops_duplicates():
    assert compare_local.parse_methods("kw, gloro,kw") == ["kw", "gloro"]
    assert compare_local.parse_methods(["GLORO"]) == ["gloro"]
    assert np.all([m in compare_local.METHODS for m in compare_local.parse_methods(",".join(compare_local.METHODS))])


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss survives fork + exec on Linux: a child of a large parent would report the parent's peak."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: the parent's peak is now ≥ 600 MiB
    code = "from glorocert.studies.isolation import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert isolation.peak_rss_bytes() > 600 * 2**20
    assert child < 400 * 2**20
    del ballast
