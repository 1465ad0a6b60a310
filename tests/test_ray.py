"""--ray: certify, compare-rs, audit and compare-local on a two-node Ray cluster on loopback give the rows and the
summary of the in-process run; a worker process or a node killed mid-run loses and duplicates no sample; an
interrupted run continues with --resume and refuses a directory made with another model or data.

One cluster serves the module (Ray takes seconds to start). Models and data are tiny (an 8×8 conv net, sklearn's
digits); every comparison is exact, over every column but the timings (``seconds``, ``batch_seconds``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra (pip install -e '.[ray]'); `make test` installs it")
from ray.cluster_utils import Cluster  # noqa: E402

from glorocert import api, distributed  # noqa: E402
from glorocert.results import read_rows  # noqa: E402
from helpers import chain_model_with_bound, make_model, run_main, save_as  # noqa: E402

TIMINGS = {"seconds", "batch_seconds", "load_rss_bytes", "peak_rss_bytes"}  # columns that measure, not certify
SUMMARY_TIMINGS = {"seconds", "forward_seconds", "samples_per_second", "distributed", "wall_seconds_smoothing_this_run",
                   "wall_seconds_this_run", "speed_ratio_smoothing_over_gloro", "peak_rss_bytes", "load_rss_bytes",
                   "seconds_per_sample", "time_ratio_vs_gloro", "local_seconds", "versions"}


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node, two logical CPUs each, on loopback; this process is the driver."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 100 * 2**20})
    nodes.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, logging_level=logging.ERROR)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the killable work below travels by value
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The chain model with its bound, another model, and digits (train split) as 8 Parquet shards of 180 rows."""
    root = tmp_path_factory.mktemp("ray")
    model = chain_model_with_bound(root)
    other = save_as(make_model("chain", seed=1), "onnx", root, "other")
    api.compute_bound(api.load(other)).save(api.default_path(other))
    shards = root / "shards"
    api.export_shards(api.open_dataset("digits", split="train"), shards, 180)
    return {"root": root, "model": model, "other": other, "shards": shards}


def _parts(directory: Path) -> dict[str, np.ndarray]:
    tables = [read_rows(p) for p in sorted((directory / distributed.ROWS_DIR).glob("part-*.parquet"))]
    return {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}


def _assert_same_rows(expected: dict, actual: dict, skip=TIMINGS) -> None:
    assert [k for k in expected if k not in skip] == [k for k in actual if k not in skip]
    for name in expected:
        if name not in skip:
            assert expected[name].dtype.kind == actual[name].dtype.kind, name
            assert np.array_equal(expected[name], actual[name], equal_nan=expected[name].dtype.kind == "f"), name


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in SUMMARY_TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _certify(workspace, tmp_path, monkeypatch, capsys, *extra, name="ray"):
    out = tmp_path / name
    code, _, err = run_main(monkeypatch, capsys, "certify", workspace["model"], "--data", workspace["shards"], "--eps", "0.1,0.3",
                            "--out", out, *extra)
    return code, out, err


# --------------------------------------------------------------------------- the four commands


def test_certify_on_ray_gives_the_rows_and_summary_of_the_in_process_run(cluster, workspace, tmp_path, monkeypatch, capsys):
    rows, summary = tmp_path / "rows.parquet", tmp_path / "summary.json"
    args = ["certify", workspace["model"], "--data", workspace["shards"], "--limit", "540", "--eps", "0.1,0.3",
            "--method", "cascade"]
    assert run_main(monkeypatch, capsys, *args, "--out", rows, "--summary", summary)[0] == 0
    code, _, err = run_main(monkeypatch, capsys, *args, "--ray", "--out", tmp_path / "ray")
    assert code == 0, err
    _assert_same_rows(read_rows(rows), _parts(tmp_path / "ray"))
    single, distributed_ = (json.loads(p.read_text()) for p in (summary, tmp_path / "ray" / "summary.json"))
    assert _without_timings(single) == _without_timings(distributed_)
    assert distributed_["distributed"]["parts"] == 3 and distributed_["distributed"]["duplicates_dropped"] == 0


def test_compare_rs_on_ray_gives_the_rows_of_the_in_process_run(cluster, workspace, tmp_path, monkeypatch, capsys):
    args = ["compare-rs", workspace["model"], "--data", "digits", "--limit", "16", "--skip", "2", "--sigma", "0.25",
            "--n0", "10", "--n", "200", "--alpha", "0.01", "--batch-size", "100", "--seed", "3"]
    assert run_main(monkeypatch, capsys, *args, "--out", tmp_path / "single")[0] == 0
    code, _, err = run_main(monkeypatch, capsys, *args, "--out", tmp_path / "ray", "--ray", "--ray-workers", "2")
    assert code == 0, err
    parts = _parts(tmp_path / "ray")
    for method in ("gloro", "smoothing"):
        expected = read_rows(tmp_path / "single" / f"{method}-rows.csv")
        actual = {"index": parts["index"], **{k.split(".", 1)[1]: v for k, v in parts.items() if k.startswith(f"{method}.")}}
        actual = {k: v for k, v in actual.items() if "@" not in k}
        if method == "gloro":
            actual["bottom"] = actual["radius"] <= 0
        _assert_same_rows(expected, actual)
    single, distributed_ = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("single", "ray"))
    assert _without_timings(single) == _without_timings(distributed_)


def test_audit_on_ray_gives_the_summary_of_the_in_process_run(cluster, workspace, tmp_path, monkeypatch, capsys):
    args = ["audit", workspace["model"], "--data", "digits", "--limit", "48", "--steps", "10", "--restarts", "1"]
    assert run_main(monkeypatch, capsys, *args, "--out", tmp_path / "single")[0] == 0
    code, _, err = run_main(monkeypatch, capsys, *args, "--out", tmp_path / "ray", "--ray")
    assert code == 0, err
    single, distributed_ = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("single", "ray"))
    assert single["audited"] > 10 and single["violations"] == 0
    assert _without_timings(single) == _without_timings(distributed_)


def test_compare_local_on_ray_gives_the_report_of_the_in_process_run(cluster, workspace, tmp_path, monkeypatch, capsys):
    args = ["compare-local", workspace["model"], "--data", "digits", "--limit", "40", "--eps", "0.05,0.1",
            "--methods", "cascade"]  # gloro, then BCP where gloro abstains: both certifiers, one run
    assert run_main(monkeypatch, capsys, *args, "--json", tmp_path / "single.json")[0] == 0
    code, _, err = run_main(monkeypatch, capsys, *args, "--json", tmp_path / "ray.json", "--ray", "--out", tmp_path / "ray")
    assert code == 0, err
    single, distributed_ = (json.loads((tmp_path / f"{d}.json").read_text()) for d in ("single", "ray"))
    assert [r["status"] for r in single["methods"]] == ["ok"] and single["methods"][0]["local"]["local_samples"] > 0
    assert _without_timings(single) == _without_timings(distributed_)


# --------------------------------------------------------------------------- faults and resume


@dataclass(frozen=True)
class _SlowWork:
    """The certify work, each worker writing its process id into ``pids`` and taking its time over each batch, so
    that the test can kill a worker (or its node) while parts remain."""

    inner: object
    pids: str
    pause: float = 0.2

    def __call__(self, localize):
        Path(self.pids, str(os.getpid())).touch()
        run = self.inner(localize)

        def rows(batch):
            time.sleep(self.pause)
            return run(batch)

        return rows


def _slow_job(workspace, pids: Path, eps=(0.1, 0.3)):
    model = api.load(workspace["model"])
    data = api.open_dataset(str(workspace["shards"]))
    bound, source = api.resolve_bound(model, None, None)
    recipe = api.ModelRecipe(str(workspace["model"]), bound_path=str(api.default_path(workspace["model"])))
    work = api.CertifyWork(recipe, bound, source, data.detached(), list(eps))
    job = distributed.Job("certify", _SlowWork(work, str(pids)), {"eps": list(eps)}, batch_size=60, part_rows=180,
                          files=recipe.files)
    return job, data, api.certify(model, data, list(eps)).rows


def test_a_worker_killed_mid_run_loses_and_duplicates_no_sample(cluster, workspace, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    job, data, expected = _slow_job(workspace, pids)
    killed = []

    def kill_one_worker(n):
        if not killed and any(pids.iterdir()):
            victim = int(sorted(pids.iterdir())[0].name)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    run = distributed.run(job, data, tmp_path / "out", workers=2, progress=kill_one_worker)
    assert killed
    _assert_same_rows(expected, run.rows)
    _assert_same_rows(expected, _parts(tmp_path / "out"))
    assert len(set(run.rows["index"])) == len(run.rows["index"]) == data.num_samples


def test_a_node_lost_mid_run_loses_and_duplicates_no_sample(cluster, workspace, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    job, data, expected = _slow_job(workspace, pids)
    lost = []

    def lose_the_worker_node(n):
        if not lost:
            lost.append(next(iter(cluster.worker_nodes)))
            cluster.remove_node(lost[0], allow_graceful=False)

    try:
        run = distributed.run(job, data, tmp_path / "out", workers=2, progress=lose_the_worker_node)
    finally:
        if lost:
            cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)  # the next tests have two nodes again
    assert lost
    _assert_same_rows(expected, run.rows)
    assert len(set(run.rows["index"])) == len(run.rows["index"]) == data.num_samples


def test_an_interrupted_run_resumes_without_redoing_finished_parts(cluster, workspace, tmp_path, monkeypatch, capsys):
    real_run = distributed.run

    def interrupted(*args, progress=None, **kwargs):
        def stop_after_two_parts(n):  # Ctrl-C once two parts are written
            progress(n)
            if len(list((tmp_path / "ray" / distributed.ROWS_DIR).glob("part-*.parquet"))) >= 2:
                raise KeyboardInterrupt

        return real_run(*args, progress=stop_after_two_parts, **kwargs)

    monkeypatch.setattr(distributed, "run", interrupted)
    code, out_dir, err = _certify(workspace, tmp_path, monkeypatch, capsys, "--ray", "--limit", "900")
    assert code == 130 and "--resume" in err
    monkeypatch.setattr(distributed, "run", real_run)
    finished = {p.name: p.stat().st_mtime_ns for p in (out_dir / distributed.ROWS_DIR).glob("part-*.parquet")}
    assert 2 <= len(finished) < 5
    code, _, err = _certify(workspace, tmp_path, monkeypatch, capsys, "--resume", "--ray", "--limit", "900")
    assert code == 0, err
    assert {p: (out_dir / distributed.ROWS_DIR / p).stat().st_mtime_ns for p in finished} == finished  # not redone
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["distributed"]["parts_resumed"] == len(finished)
    expected = api.certify(api.load(workspace["model"]), api.open_dataset(str(workspace["shards"]), limit=900), [0.1, 0.3]).rows
    _assert_same_rows(expected, _parts(out_dir))


def test_resume_refuses_a_directory_made_with_another_model_or_data(cluster, workspace, tmp_path, monkeypatch, capsys):
    code, out_dir, err = _certify(workspace, tmp_path, monkeypatch, capsys, "--ray", "--limit", "180")
    assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, "certify", workspace["other"], "--data", workspace["shards"],
                            "--eps", "0.1,0.3", "--limit", "180", "--out", out_dir, "--ray", "--resume")
    assert code == 2 and "other settings" in err and "model_sha256" in err and "bound_sha256" in err
    code, _, err = _certify(workspace, tmp_path, monkeypatch, capsys, "--ray", "--resume", "--limit", "360")
    assert code == 2 and "data.num_samples 180 → 360" in err
    code, _, err = _certify(workspace, tmp_path, monkeypatch, capsys, "--ray", "--limit", "180")
    assert code == 2 and "pass --resume" in err


# --------------------------------------------------------------------------- without Ray


def test_ray_options_without_ray_installed_say_how_to_install_it(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as where it is not installed
    code, _, err = run_main(monkeypatch, capsys, "certify", workspace["model"], "--data", "digits", "--out",
                            tmp_path / "out", "--ray")
    assert code == 2 and "pip install 'glorocert[ray]'" in err
    assert not (tmp_path / "out").exists()


def test_ray_options_are_checked_before_any_work(workspace, tmp_path, monkeypatch, capsys):
    certify = ["certify", workspace["model"], "--data", "digits"]
    for extra, message in ((["--ray"], "give --out DIR"), (["--ray", "--out", tmp_path / "r.csv"], "names a directory"),
                           (["--resume"], "add --ray"), (["--ray-workers", "2"], "add --ray"),
                           (["--ray", "--out", tmp_path / "d", "--ray-workers", "0"], "at least 1")):
        code, _, err = run_main(monkeypatch, capsys, *certify, *extra)
        assert code == 2 and message in err, (extra, err)
