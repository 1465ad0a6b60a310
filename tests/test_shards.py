"""Parquet shards: export_shards writes any dataset, open_dataset reads a shard directory or glob back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glorocert import api, data
from glorocert.data import MANIFEST, export_shards, open_dataset
from glorocert.errors import GlorocertError
from helpers import run_main

ROOT = Path(__file__).resolve().parents[1]
MNIST_MODEL = ROOT / "models" / "mnist-5k-eps0.3" / "model.onnx"


def collect(dataset, batch_size=64):
    batches = list(dataset.batches(batch_size))
    y = None if batches[0].y is None else np.concatenate([b.y for b in batches])
    return np.concatenate([b.index for b in batches]), np.concatenate([b.x for b in batches]), y


def assert_same(source, shards):
    assert (shards.shape, shards.num_samples, shards.num_classes, shards.has_labels) == \
        (source.shape, source.num_samples, source.num_classes, source.has_labels)
    (i1, x1, y1), (i2, x2, y2) = collect(source, 50), collect(shards, 33)
    assert np.array_equal(i1, i2) and x1.dtype == x2.dtype == np.float32
    assert x1.tobytes() == x2.tobytes()  # bit-identical
    assert (y1 is None and y2 is None) or np.array_equal(y1, y2)


def refused(match, call, *args, **kwargs):
    """``call`` raises a one-line GlorocertError matching ``match``."""
    with pytest.raises(GlorocertError, match=match) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "batches"):
            list(result.batches(64))
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory):
    """mnist-5k test[:300] exported as 128-row shards (128, 128, 44)."""
    out = tmp_path_factory.mktemp("shards") / "mnist"
    return out, export_shards(open_dataset("mnist-5k", limit=300), out, 128)


# --------------------------------------------------------------------------- round trips


def test_builtin_round_trip_and_layout(mnist_shards):
    out, paths = mnist_shards
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [128, 128, 44]
    assert (manifest["shape"], manifest["num_samples"], manifest["source"]) == ([1, 28, 28], 300, "mnist-5k[test]")
    table = pq.read_table(paths[0])
    assert table.schema.names == ["index", "x", "label"]
    assert table.schema.field("x").type == pa.fixed_shape_tensor(pa.float32(), [1, 28, 28])
    header = json.loads(table.schema.metadata[b"glorocert"])
    assert header["scaled"] is True and header["format"] == 1
    assert_same(open_dataset("mnist-5k", limit=300), open_dataset(out))


def test_npz_nhwc_uint8_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8), y=rng.integers(0, 4, 40))
    source = open_dataset(tmp_path / "d.npz")
    export_shards(source, tmp_path / "s", 16)
    assert source.shape == (3, 6, 5)
    assert_same(source, open_dataset(tmp_path / "s"))


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rows = np.column_stack([rng.integers(0, 3, 25), rng.integers(0, 256, (25, 16))])
    (tmp_path / "d.csv").write_text("label," + ",".join(f"p{i}" for i in range(16)) + "\n"
                                    + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    source = open_dataset(tmp_path / "d.csv")
    export_shards(source, tmp_path / "s", 10)
    assert_same(source, open_dataset(tmp_path / "s"))


def test_image_folder_round_trip(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow")
    rng = np.random.default_rng(2)
    for name in ("cat", "dog"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB").save(tmp_path / "img" / name / f"{k}.png")
    source = open_dataset(tmp_path / "img")
    export_shards(source, tmp_path / "s", 4)
    shards = open_dataset(tmp_path / "s")
    assert shards.shape == (3, 4, 5)
    assert_same(source, shards)


def test_unlabelled_npy_has_no_label_column(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(3).random((30, 1, 4, 4), dtype=np.float32))
    source = open_dataset(tmp_path / "x.npy")
    paths = export_shards(source, tmp_path / "s", 7)
    assert len(paths) == 5 and pq.read_schema(paths[0]).names == ["index", "x"]
    shards = open_dataset(tmp_path / "s")
    assert not shards.has_labels and shards.num_classes is None
    assert_same(source, shards)


def test_export_of_a_window_keeps_the_source_indices(tmp_path):
    source = open_dataset("digits", start=50, limit=40)
    export_shards(source, tmp_path / "s", 16)
    assert_same(source, open_dataset(tmp_path / "s"))  # indices 50..89, as in the source
    index, _, _ = collect(open_dataset(tmp_path / "s", start=10, limit=5))  # start/limit count rows of the shards
    assert index.tolist() == [60, 61, 62, 63, 64]


# --------------------------------------------------------------------------- windows, globs, options


@pytest.mark.parametrize("start, limit, batch", [(0, None, 300), (100, 100, 37), (127, 2, 1), (128, 128, 50), (250, None, 7)])
def test_start_and_limit_across_shard_boundaries(mnist_shards, start, limit, batch):
    out, _ = mnist_shards
    expected = collect(open_dataset("mnist-5k", start=start, limit=300 - start if limit is None else limit))
    for spec in (out, f"{out}/part-*.parquet"):
        got = collect(open_dataset(spec, start=start, limit=limit), batch)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_a_glob_selects_some_shards_and_a_file_is_one_shard(mnist_shards):
    out, paths = mnist_shards
    index, x, y = collect(open_dataset(f"{out}/part-0000[12].parquet"))
    assert index.tolist() == list(range(128, 300))
    _, x_all, y_all = collect(open_dataset("mnist-5k", limit=300))
    assert np.array_equal(x, x_all[128:]) and np.array_equal(y, y_all[128:])
    assert open_dataset(paths[2]).num_samples == 44
    refused("no files match", open_dataset, f"{out}/nothing-*.parquet")


def test_normalisation_and_input_shape_apply_when_reading(mnist_shards):
    out, _ = mnist_shards
    dataset = open_dataset(out, mean=0.1307, std=0.3081, input_shape=(784,))
    assert dataset.normalization.mean == (0.1307,) and dataset.shape == (784,)
    assert next(dataset.batches(8)).x.shape == (8, 784)
    refused("drop --scale", open_dataset, out, scale="255")
    refused("separate labels file", open_dataset, out, labels=out / MANIFEST)
    refused("input shape", open_dataset, out, input_shape=(3, 28, 28))


def test_export_refuses_bad_requests(tmp_path, mnist_shards):
    out, _ = mnist_shards
    refused("at least 1", export_shards, open_dataset("digits", limit=5), tmp_path / "a", 0)
    refused("drop --mean/--std", export_shards, open_dataset("digits", limit=5, mean=0.5, std=0.5), tmp_path / "b", 4)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    refused("not glorocert shards", export_shards, open_dataset("digits", limit=5), tmp_path / "c", 4)
    refused("being exported", export_shards, open_dataset(out), out, 64)
    assert (tmp_path / "c" / "notes.txt").exists() and not (tmp_path / "a").exists()


def test_reexport_replaces_a_former_export(tmp_path):
    export_shards(open_dataset("digits", limit=100), tmp_path / "s", 20)  # 5 shards
    source = open_dataset("digits", start=7, limit=30)
    assert len(export_shards(source, tmp_path / "s", 16)) == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    assert_same(source, open_dataset(tmp_path / "s"))


# --------------------------------------------------------------------------- interrupted, damaged, foreign


class Interrupt:
    def __init__(self, after):
        self.calls, self.after = 0, after

    def __call__(self, n):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt


def test_an_interrupted_export_leaves_nothing_that_reads_as_data(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        export_shards(open_dataset("digits", limit=100), tmp_path / "s", 20, progress=Interrupt(3))  # in shard 2
    assert not (tmp_path / "s").exists()
    export_shards(open_dataset("digits", limit=100), tmp_path / "t", 20)  # an export, then an interrupted re-export
    with pytest.raises(KeyboardInterrupt):
        export_shards(open_dataset("digits", limit=60), tmp_path / "t", 20, progress=Interrupt(2))
    refused(r"no _manifest\.json.*re-run", open_dataset, tmp_path / "t")


def test_a_directory_without_its_manifest_is_refused(mnist_shards, tmp_path):
    out, _ = mnist_shards
    export_shards(open_dataset("digits", limit=30), tmp_path / "s", 10)
    (tmp_path / "s" / MANIFEST).unlink()
    refused(r"export did not finish.*re-run", open_dataset, tmp_path / "s")
    refused(r"not listed|no _manifest", open_dataset, f"{tmp_path}/s/part-*.parquet")
    (tmp_path / "s" / MANIFEST).write_text("{not json")
    refused("not a valid glorocert shard manifest", open_dataset, tmp_path / "s")


def test_damaged_or_missing_shards_are_refused(tmp_path):
    source = open_dataset("digits", limit=60)
    for name in ("flipped", "truncated", "missing"):
        export_shards(source, tmp_path / name, 20)
    shard = tmp_path / "flipped" / "part-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # same size, different bytes: found by the sha256 when the shard is read
    shard.write_bytes(bytes(raw))
    refused(r"part-00001\.parquet is not the file that was exported.*re-run", open_dataset, tmp_path / "flipped")
    shard = tmp_path / "truncated" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(r"part-00002\.parquet.*re-run", open_dataset, tmp_path / "truncated")
    (tmp_path / "missing" / "part-00000.parquet").unlink()
    refused(r"part-00000\.parquet is missing.*re-run", open_dataset, tmp_path / "missing")


def test_a_parquet_file_that_is_no_shard_is_refused(tmp_path):
    pq.write_table(pa.table({"a": [1, 2, 3]}), tmp_path / "plain.parquet")
    refused("not a glorocert shard", open_dataset, tmp_path / "plain.parquet")
    refused("not a glorocert shard", open_dataset, f"{tmp_path}/*.parquet")


def test_rebatch_keeps_the_rows_pending_when_the_window_ends():
    chunks = [np.arange(a, b) for a, b in ((0, 37), (37, 74), (74, 111), (111, 128), (128, 165), (165, 202), (202, 239))]
    batches = list(data._rebatch(iter(chunks), 100, 100, 37))
    assert np.array_equal(np.concatenate(batches), np.arange(100, 200)) and [len(b) for b in batches] == [37, 37, 26]


# --------------------------------------------------------------------------- certify


def test_certify_on_shards_gives_the_rows_of_the_source(mnist_shards):
    out, _ = mnist_shards
    model = api.load(MNIST_MODEL)
    source = api.certify(model, open_dataset("mnist-5k", limit=300), eps=[0.3, 1.0])
    shards = api.certify(model, open_dataset(out), eps=[0.3, 1.0])
    columns = [c for c in source.rows if "second" not in c]
    assert columns == [c for c in shards.rows if "second" not in c] and "index" in columns
    for c in columns:
        assert np.array_equal(source.rows[c], shards.rows[c], equal_nan=source.rows[c].dtype.kind == "f"), c


def test_data_export_from_the_cli_then_certify_reads_the_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "shards"
    code, stdout, err = run_main(monkeypatch, capsys, "data", "export", "mnist-5k", "--limit", "150", "--out", str(out),
                                 "--shard-rows", "64")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    model = "models/mnist-5k-eps0.3/model.onnx"
    rows = {}
    for name, source in (("shards", [str(out)]), ("source", ["mnist-5k", "--limit", "150"])):
        code, stdout, err = run_main(monkeypatch, capsys, "certify", model, "--data", *source, "--out", str(tmp_path / f"{name}.csv"))
        assert code == 0, err
        rows[name] = (tmp_path / f"{name}.csv").read_text()
    assert rows["shards"] == rows["source"]
    code, stdout, err = run_main(monkeypatch, capsys, "data", "export", "mnist-5k", "--out", str(out), "--data", "digits")
    assert code == 2 and "SOURCE" in err
