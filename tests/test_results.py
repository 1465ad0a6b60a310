"""Results: atomic writes, exact round trips, summaries against hand computation, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glorocert.errors import GlorocertError
from glorocert.files import atomic_write, write_json
from glorocert.render import summary_table
from glorocert.results import certified_accuracy_curve, eps_key, plot_curves, read_rows, summarize, write_rows


def rows(n=50, seed=0):
    rng = np.random.default_rng(seed)
    radius = rng.random(n) * 3
    radius[:3] = [0.0, 5e-324, np.nextafter(1.0, 2.0)]  # subnormal and 1 + ulp must survive
    return {
        "index": np.arange(n, dtype=np.int64),
        "label": rng.integers(-1, 10, n),
        "predicted": rng.integers(0, 10, n),
        "bottom@0.3": radius <= 0.3,
        "radius": radius,
        "radius32": radius.astype(np.float32),
    }


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_leaves_no_file_when_interrupted(tmp_path, error):
    target = tmp_path / "out.csv"
    with pytest.raises(error):
        with atomic_write(target) as tmp:
            tmp.write_text("half a fi")
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_previous_file_when_interrupted(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"run": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text('{"run": 2')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"run": 1} and list(tmp_path.iterdir()) == [target]


def test_atomic_write_to_unwritable_place_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(GlorocertError, match=str(blocker / "out.csv")):
        with atomic_write(blocker / "out.csv"):
            pass


def test_writes_create_missing_directories(tmp_path):
    write_json(tmp_path / "a" / "b" / "s.json", {"x": 1})
    assert (tmp_path / "a" / "b" / "s.json").exists()


# --------------------------------------------------------------------------- rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_rows_round_trip_exactly_in_column_order(tmp_path, suffix):
    columns = rows()
    write_rows(tmp_path / f"r{suffix}", columns, schema_version="1")
    back = read_rows(tmp_path / f"r{suffix}")
    assert list(back) == list(columns)
    for name, values in columns.items():
        expected = values.astype(np.float64) if values.dtype == np.float32 else values
        if suffix == ".parquet":
            expected = values  # parquet keeps float32 as float32
        assert back[name].dtype == expected.dtype, name
        assert np.array_equal(back[name], expected), name  # bit-exact, never rounded


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_rows_written_in_chunks_equal_the_standard_writers_in_one_go(tmp_path, suffix):
    import csv

    columns = rows(70_000)  # more than one chunk of Python values
    columns["note"] = np.where(columns["bottom@0.3"], "a,b", 'say "hi"')  # text that needs quoting: the csv path
    for name, table in (("numbers", {k: v for k, v in columns.items() if k != "note"}), ("text", columns)):
        write_rows(tmp_path / f"{name}{suffix}", table, "1")
        values = [(a.astype(np.float64) if a.dtype.kind == "f" else a).tolist() for a in table.values()]
        with open(tmp_path / f"expected{suffix}", "w", newline="") as f:
            if suffix == ".csv":
                csv.writer(f, lineterminator="\n").writerows([list(table), *zip(*values)])
            else:
                f.writelines(json.dumps(dict(zip(table, row))) + "\n" for row in zip(*values))
        assert (tmp_path / f"{name}{suffix}").read_bytes() == (tmp_path / f"expected{suffix}").read_bytes(), name


def test_parquet_carries_schema_version(tmp_path):
    import pyarrow.parquet as pq

    write_rows(tmp_path / "r.parquet", rows(5), schema_version="3")
    assert pq.read_schema(tmp_path / "r.parquet").metadata[b"glorocert.schema_version"] == b"3"


def test_non_finite_radii_survive_csv_and_jsonl(tmp_path):
    columns = {"radius": np.array([np.inf, 0.0, np.nan])}
    for suffix in (".csv", ".jsonl"):
        write_rows(tmp_path / f"r{suffix}", columns, "1")
        np.testing.assert_array_equal(read_rows(tmp_path / f"r{suffix}")["radius"], columns["radius"])


def test_unknown_row_format_lists_the_supported_ones(tmp_path):
    with pytest.raises(GlorocertError, match=".csv, .jsonl, .parquet"):
        write_rows(tmp_path / "r.xlsx", rows(3), "1")
    assert not (tmp_path / "r.xlsx").exists()


def test_write_json_converts_numpy(tmp_path):
    write_json(tmp_path / "s.json", {"a": np.float64(0.1), "b": np.int64(3), "c": np.array([True]), np.int64(4): None})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"a": 0.1, "b": 3, "c": [True], "4": None} and '\n  "a"' in text


# --------------------------------------------------------------------------- summaries


def test_eps_key_is_stable_across_float_widths():
    assert eps_key(0.3) == eps_key(np.float32(0.3)) == "0.3"
    assert eps_key(1.58) == "1.58" and eps_key(36 / 255) == "0.141176" and eps_key(1) == "1"


def test_summarize_matches_hand_computation():
    # sample:     0     1     2     3     4     5
    # label:      0     1     2     3    -1    -1
    # predicted:  0     1     0     3     5     6     → correct: T T F T (unknown) (unknown)
    # radius:    0.5   0.1   0.9   0.0   0.4   0.2
    label = np.array([0, 1, 2, 3, -1, -1])
    predicted = np.array([0, 1, 0, 3, 5, 6])
    radius = np.array([0.5, 0.1, 0.9, 0.0, 0.4, 0.2])
    columns = {"label": label, "predicted": predicted, "radius": radius}
    known, correct = label >= 0, predicted == label
    for e in (0.15, 0.45):
        bottom = radius <= e
        columns[f"bottom@{eps_key(e)}"] = bottom
        columns[f"certified@{eps_key(e)}"] = ~bottom & (correct | ~known)
    summary = summarize(columns, eps=[0.15, 0.45], radius_grid=[0.0, 0.3, 1.0])
    assert summary["num_samples"] == 6
    assert summary["clean_accuracy"] == 3 / 4
    # certified@0.15: samples 0 and 4, 5 (unknown, not bottom) → 3/6; @0.45: sample 0 → 1/6
    assert summary["vra"] == {"0.15": 3 / 6, "0.45": 1 / 6}
    assert summary["bottom_rate"] == {"0.15": 2 / 6, "0.45": 4 / 6}
    # radius counted for correct-or-unknown samples 0, 1, 3, 4, 5: (0.5 + 0.1 + 0 + 0.4 + 0.2) / 6
    assert summary["average_certified_radius"] == pytest.approx(1.2 / 6)
    # radius > 0: samples 0, 1, 4, 5 → 4/6; > 0.3: 0, 4 → 2/6; > 1: none
    assert summary["certified_accuracy"] == [
        {"radius": 0.0, "accuracy": 4 / 6},
        {"radius": 0.3, "accuracy": 2 / 6},
        {"radius": 1.0, "accuracy": 0.0},
    ]
    json.dumps(summary)  # plain JSON types only


def test_summarize_without_labels_and_default_grid():
    columns = {"label": np.full(4, -1), "predicted": np.zeros(4, int), "radius": np.array([0.0, 1.0, 2.0, 4.0])}
    columns["bottom@1"] = columns["radius"] <= 1
    summary = summarize(columns, eps=[1.0])
    # no labels: no accuracy and no VRA, only the fraction of predictions certified (issue 15)
    assert summary["clean_accuracy"] is None and summary["vra"] is None and summary["certified_rate"] == {"1": 0.5}
    grid = [point["radius"] for point in summary["certified_rate_curve"]]
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 4.0
    assert summary["certified_rate_curve"][-1]["rate"] == 0.0  # strictly above the largest radius: none


def test_certified_accuracy_curve_decides_ties_against_certification():
    grid, accuracy = certified_accuracy_curve(np.array([0.5, 0.5, 1.0]), np.array([True, True, False]), np.array([0.0, 0.5]))
    assert accuracy.tolist() == [2 / 3, 0.0]


def test_near_duplicate_eps_are_refused():
    columns = {"label": np.zeros(1, int), "predicted": np.zeros(1, int), "radius": np.zeros(1), "bottom@0.1": np.ones(1, bool)}
    with pytest.raises(GlorocertError, match="not distinct"):
        summarize(columns, eps=[0.1, 0.1 + 1e-12])


def test_summary_table_shows_every_headline_number():
    from rich.console import Console

    summary = {"num_samples": 10, "clean_accuracy": 0.9, "vra": {"0.3": 0.75}, "bottom_rate": {"0.3": 0.2},
               "average_certified_radius": 0.41234, "bound_mode": "estimate"}
    console = Console(width=100, record=True)
    console.print(summary_table(summary, "mnist"))
    text = console.export_text()
    for needle in ("90.00%", "VRA @ ε=0.3", "75.00%", "⊥ rate @ ε=0.3", "20.00%", "0.4123", "ESTIMATE"):
        assert needle in text


# --------------------------------------------------------------------------- plots


def test_plot_is_a_valid_png(tmp_path):
    from PIL import Image

    radius, correct = np.linspace(0, 2, 30), np.arange(30) % 3 > 0
    curves = {"gloro": certified_accuracy_curve(radius, correct, np.linspace(0, 2, 21)),
              "smoothing": certified_accuracy_curve(radius / 2, correct, np.linspace(0, 2, 21))}
    plot_curves(tmp_path / "curve.png", curves, title="certified accuracy")
    with Image.open(tmp_path / "curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
    with pytest.raises(GlorocertError, match=".png, .svg, .pdf"):
        plot_curves(tmp_path / "curve.gif", curves, title="x")
