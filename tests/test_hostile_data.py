"""Issue 15, the data items: what a careless or hostile user's data made glorocert claim or hide.

Each test failed before its fix: binarised integers divided by 255 without a word, image folders
whose integer names were not the labels, unlabelled data reported with a "VRA", an npz message
pointing at an option the CLI lacks, a headerless CSV with a label column and a ragged CSV given no
hint or line, and an empty validation split that did not say why.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glorocert.data import open_dataset
from glorocert.errors import GlorocertError
from glorocert.render import summary_table
from glorocert.results import eps_key, summarize
from helpers import run_main


def collect(dataset, batch_size=64):
    batches = list(dataset.batches(batch_size))
    return np.concatenate([b.x for b in batches]), None if batches[0].y is None else np.concatenate([b.y for b in batches])


def _table_text(summary: dict) -> str:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(summary_table(summary, "t"))
    return console.export_text()


# --------------------------------------------------------------------------- 1. --scale auto on binarised integers


def test_scale_auto_keeps_binarised_integers_and_says_what_it_did(tmp_path):
    binary = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], np.uint8)
    np.save(tmp_path / "binary.npy", binary)
    dataset = open_dataset(tmp_path / "binary.npy")
    assert collect(dataset)[0].reshape(2, 4).tolist() == binary.tolist()  # not divided by 255
    assert any("used as they are" in n and "--scale 255" in n for n in dataset.notes), dataset.notes
    np.save(tmp_path / "bytes.npy", np.array([[0, 3, 255, 7]], np.int64))
    dataset = open_dataset(tmp_path / "bytes.npy")
    assert collect(dataset)[0].max() == 1.0
    assert any("divided by 255" in n for n in dataset.notes), dataset.notes
    # the user's explicit choice needs no note; a built-in's scaling is fixed and documented
    assert open_dataset(tmp_path / "binary.npy", scale="255").notes == []
    assert open_dataset("digits", limit=3).notes == []


def test_cli_prints_the_scaling_note(monkeypatch, capsys, workspace, tmp_path):
    x = np.load(workspace["data"] / "x.npy")
    np.save(tmp_path / "binary.npy", (x > 0.5).astype(np.uint8))
    code, _, err = run_main(monkeypatch, capsys, "certify", workspace["onnx"], "--data", tmp_path / "binary.npy",
                            "--labels", workspace["data"] / "y.npy", "--eps", "0.01")
    assert code == 0, err
    assert "note:" in err and "used as they are" in err


# --------------------------------------------------------------------------- 2. image folders named by class id


def _image_folder(root, names, per_class=2):
    from PIL import Image

    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((4, 4), 10 * i, np.uint8), "L").save(root / name / f"{i}.png")


def test_image_folders_named_by_integers_keep_those_labels(tmp_path):
    _image_folder(tmp_path / "digits", ["3", "5", "7", "10"])
    dataset = open_dataset(tmp_path / "digits")
    _, y = collect(dataset)
    assert y.tolist() == [3, 3, 5, 5, 7, 7, 10, 10]
    assert dataset.num_classes == 11


def test_image_folders_named_otherwise_say_which_label_each_name_got(tmp_path):
    _image_folder(tmp_path / "pets", ["dog", "cat", "3"])
    dataset = open_dataset(tmp_path / "pets")
    assert collect(dataset)[1].tolist() == [0, 0, 1, 1, 2, 2]
    assert any("3 → 0" in n and "cat → 1" in n and "dog → 2" in n for n in dataset.notes), dataset.notes


# --------------------------------------------------------------------------- 3. unlabelled data has no VRA


def _unlabelled_columns():
    columns = {"label": np.full(4, -1), "predicted": np.zeros(4, int), "radius": np.array([0.0, 1.0, 2.0, 4.0])}
    for e in (0.5, 1.0):
        columns[f"bottom@{eps_key(e)}"] = columns["radius"] <= e
        columns[f"certified@{eps_key(e)}"] = ~columns[f"bottom@{eps_key(e)}"]  # every row "correct", as rows record it
    return columns


def test_summary_of_unlabelled_data_reports_a_certified_rate_not_a_vra():
    summary = summarize(_unlabelled_columns(), eps=[0.5, 1.0])
    assert summary["vra"] is None and summary["clean_accuracy"] is None
    assert summary["certified_rate"] == {"0.5": 0.75, "1": 0.5}
    assert summary["bottom_rate"] == {"0.5": 0.25, "1": 0.5}
    assert summary["certified_accuracy"] is None and summary["average_certified_radius"] is None
    assert summary["average_radius"] == pytest.approx(7 / 4)  # over every prediction: correctness is unknown
    assert summary["certified_rate_curve"][0] == {"radius": 0.0, "rate": 0.75}
    json.dumps(summary)
    text = _table_text(summary)
    assert "VRA" not in text and "certified (unlabelled) @ ε=0.5" in text and "75.00%" in text
    assert "accuracy" not in text.replace("clean accuracy", "")


def test_cli_certify_on_unlabelled_data_says_certified_not_vra(monkeypatch, capsys, workspace, out_dir):
    code, out, err = run_main(monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "x.npy",
                              "--eps", "0.01", "--summary", out_dir / "summary.json", width=200)
    assert code == 0, err
    assert "VRA" not in out and "certified (unlabelled)" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["vra"] is None and set(summary["certified_rate"]) == {"0.01"}


def test_fail_under_on_unlabelled_data_is_refused_before_any_work(monkeypatch, capsys, workspace, out_dir):
    code, _, err = run_main(monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "x.npy",
                            "--eps", "0.01", "--fail-under", "0.5", "--out", out_dir / "rows.csv")
    assert code == 2 and "--fail-under" in err and "labels" in err
    assert list(out_dir.iterdir()) == []


def test_compare_local_on_unlabelled_data_is_refused(monkeypatch, capsys, workspace, out_dir):
    code, _, err = run_main(monkeypatch, capsys, "compare-local", workspace["onnx"], "--data", workspace["data"] / "x.npy",
                            "--methods", "gloro", "--json", out_dir / "r.json")
    assert code == 2 and "labels" in err
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- 4. npz without x


def test_npz_without_x_lists_its_arrays_and_says_how_to_resave(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4)), targets=np.zeros(2, int))
    with pytest.raises(GlorocertError) as caught:
        open_dataset(tmp_path / "d.npz")
    message = str(caught.value)
    assert "images, targets" in message and "numpy.savez" in message and "x=" in message
    assert "x_key" not in message  # the CLI has no such option


def test_npz_without_y_says_it_is_unlabelled_and_names_its_other_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4)), labels=np.zeros(2, int))
    dataset = open_dataset(tmp_path / "d.npz")
    assert not dataset.has_labels
    assert any("no array 'y'" in n and "labels" in n for n in dataset.notes), dataset.notes
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    assert open_dataset(tmp_path / "d.npz", labels=tmp_path / "y.npy").notes == []  # labelled after all: nothing to say


# --------------------------------------------------------------------------- 5., 6. CSV without a header, ragged CSV


def _headerless_labelled_csv(path, rows=6, side=4):
    rng = np.random.default_rng(0)
    lines = [",".join(map(str, [k % 3, *rng.integers(0, 256, side * side)])) for k in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_headerless_csv_whose_first_column_looks_like_labels_gets_a_hint(tmp_path):
    _headerless_labelled_csv(tmp_path / "d.csv")
    dataset = open_dataset(tmp_path / "d.csv")
    assert not dataset.has_labels
    assert any("label" in n and "header" in n for n in dataset.notes), dataset.notes
    with pytest.raises(GlorocertError, match="named label"):
        open_dataset(tmp_path / "d.csv", input_shape=(1, 4, 4))  # 17 values: the label column is read as a pixel
    (tmp_path / "plain.csv").write_text("0,0.5,1,0\n1,0,0,0.25\n")  # 4 values: a square image, no hint
    assert not any("label" in n for n in open_dataset(tmp_path / "plain.csv").notes)


def test_ragged_csv_names_the_line(tmp_path):
    (tmp_path / "r.csv").write_text("label,a,b\n0,1,2\n1,3,4\n2,5\n0,6,7\n")
    with pytest.raises(GlorocertError, match=r"line 4 has 2 values.*3"):
        open_dataset(tmp_path / "r.csv")
    (tmp_path / "n.csv").write_text("1,2,3\n4,5,6\n\n7,8,9,10\n")
    with pytest.raises(GlorocertError, match=r"line 4 has 4 values"):
        open_dataset(tmp_path / "n.csv")


# --------------------------------------------------------------------------- 7. empty validation split


def test_empty_validation_split_says_why_and_what_to_do(tmp_path):
    from glorocert.train.datasets import load_training_data

    x = np.random.default_rng(0).random((6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "tiny.npz", x=x, y=np.array([0, 0, 1, 1, 2, 2]))
    with pytest.raises(GlorocertError) as caught:
        load_training_data(str(tmp_path / "tiny.npz"))
    message = str(caught.value)
    assert "validation" in message and "6 labelled samples" in message and "3 classes" in message
    assert "20 %" in message and "at least 3" in message


def test_train_with_an_empty_validation_set_says_what_was_given():
    from glorocert.train import TrainConfig, train

    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(GlorocertError, match=r"validation set is empty: x_val holds 0 samples.*held-out"):
        train(TrainConfig(epochs=1), x, y, x[:0], y[:0])
