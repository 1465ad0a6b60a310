"""Run a command's per-batch work on a Ray cluster (``--ray``): Ray Data in, an actor pool, Parquet row parts out.

Nothing here knows what a batch is certified for. A :class:`Job` carries the command's work: a picklable
factory that each worker (a Ray actor) calls once — it loads the model and the frozen bound — and that returns
the same per-batch function the command runs in process. The driver (this process):

1. plans the run as *parts*: consecutive samples of the dataset window, at most ``part_rows`` of them and never
   across a shard. A part is the unit that is written, checked and resumed: ``OUT/rows/part-NNNNN.parquet``;
2. records what the rows depend on in ``OUT/_run.json`` before any work — the command's parameters, the
   sha256 of the model and of the bound, the dataset's fingerprint, the plan. With ``resume`` it skips the
   parts whose files are complete and valid and refuses a directory made with anything else, naming each
   difference; without it, it refuses a directory that holds an earlier run;
3. builds a Ray Dataset of the remaining samples. Parquet shards (``glorocert data export``) are read by Ray
   Data itself (``read_parquet``; each shard's sha256 is checked by a Ray task beside the read, and a part is
   written only once its shard has passed). Any other data is read here, checked as in process, and handed to
   Ray as in-memory blocks of a few batches: it needs no storage that every node can read, but it passes through
   this process — export shards for data that does not fit its memory. Ray Data gives each block to one task,
   so a shard is one worker's work: export at least a few shards per worker;
4. maps it with ``map_batches`` onto an actor pool (``ActorPoolStrategy``, one CPU per actor, spread over the
   nodes: Ray Data's default scheduling). Ray Data restarts an actor that dies (a killed worker process, a lost
   node) and retries the tasks it held (its defaults: no limit on either), and Ray rebuilds the blocks a dead
   node held from their lineage. An exception raised by the work itself is not retried: it ends the run;
5. receives the rows as they finish, keeps a sample that arrives twice (a retried task) once, writes each part
   atomically when all its samples are in, and reports samples done across the cluster;
6. reads every part back, in order: the rows, from which the command computes its summary (in process, with
   the same function as without Ray).

Ray is imported only here, only when a command is given ``--ray``: without it everything runs in process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glorocert.data import Batch, Dataset, check_pixels
from glorocert.errors import GlorocertError
from glorocert.files import jsonable, sha256_of, write_json
from glorocert.results import read_rows, write_rows

__all__ = ["INSTALL_HINT", "Job", "Part", "RUN_MANIFEST", "ROWS_DIR", "Run", "connect", "plan_parts", "require", "run"]

RUN_MANIFEST = "_run.json"  # what the rows depend on: --resume refuses a directory whose manifest differs
ROWS_DIR = "rows"  # OUT/rows/part-NNNNN.parquet, one per part
MANIFEST_FORMAT = 1
PART = "_part"  # the column that tells the driver which part a row belongs to (never written)
BLOCK_BATCHES = 4  # batches per in-memory block: Ray Data's unit of work (a shard is one block)
INSTALL_HINT = "pip install 'glorocert[ray]' (Ray Data 2.60)"


@dataclass(frozen=True)
class Job:
    """One command's distributed run, as the driver and every worker need it (pickled to each worker).

    ``work(localize)`` runs once per worker and returns the per-batch function: :class:`~glorocert.data.Batch`
    → columns, one row per sample of the batch, in order, with the batch's ``index``. ``localize(path)`` gives
    the worker a readable copy of one of ``files`` (the file itself where the node can read it unchanged, else
    the driver's bytes, shipped through Ray's object store). ``identity``: everything else the rows depend on
    (the command's parameters, JSON values). ``skip``: keep only samples whose index is a multiple of it.
    """

    command: str
    work: Callable[[Callable[[str], str]], Callable[[Batch], Mapping[str, np.ndarray]]]
    identity: dict
    batch_size: int
    part_rows: int = 10_000
    skip: int = 1
    files: tuple[str, ...] = ()
    schema_version: str = "1"


@dataclass(frozen=True)
class Part:
    """Samples ``rows`` kept in the window's rows ``[first_row, stop_row)`` (of shard ``shard``, or of the whole
    window when the data is not sharded): the ``rows`` of them have indices ``first``…``last``, increasing."""

    number: int
    shard: int | None
    first_row: int
    stop_row: int
    first: int
    last: int
    rows: int


@dataclass
class Run:
    """The rows of a distributed run, in dataset order, and how it went."""

    rows: dict[str, np.ndarray]
    address: str
    workers: int
    parts: int
    parts_resumed: int
    duplicates: int = 0  # samples received twice (a retried task) and kept once

    def report(self) -> dict:
        """What a summary says about the run (none of it changes a result)."""
        return {"address": self.address, "workers": self.workers, "parts": self.parts,
                "parts_resumed": self.parts_resumed, "duplicates_dropped": self.duplicates}


# --------------------------------------------------------------------------- connecting


def require() -> None:
    """Refuse, before any work, to run on Ray where it is not installed (saying how to install it)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise GlorocertError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None


def connect(address: str | None):
    """The ``ray`` module, connected: ``None`` or ``auto`` — ``RAY_ADDRESS`` if set, else a new local cluster;
    ``ray://host:port`` or ``host:port`` — that cluster. A process already connected keeps its connection."""
    require()
    import ray

    if not ray.is_initialized():
        local = address in (None, "", "auto") and not os.environ.get("RAY_ADDRESS")
        options = {"include_dashboard": False} if local else {}
        try:
            ray.init(address=None if address in (None, "", "auto") else address, log_to_driver=False,
                     logging_level=logging.ERROR, **options)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise GlorocertError(f"--ray {address or 'auto'}: cannot connect to a Ray cluster ({e})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command shows its own, counting samples across the cluster
    context.print_on_execution_start = False
    context.use_datasource_v2 = False  # the v2 Parquet reader imports fsspec's HTTP filesystem from threads (needs aiohttp)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


# --------------------------------------------------------------------------- the plan


def plan_parts(dataset: Dataset, part_rows: int, skip: int = 1) -> list[Part]:
    """The window cut into parts of at most ``part_rows`` rows (never across a shard); parts with no kept sample
    (``index % skip == 0``) are left out. Refuses shards whose sample indices do not increase."""
    if part_rows < 1:
        raise GlorocertError(f"part rows must be at least 1 (got {part_rows})")
    windows = dataset.shard_windows()
    spans = [(k, w.first, w.indices) for k, w in enumerate(windows)] if windows else [(None, 0, dataset.sample_indices())]
    parts: list[Part] = []
    for shard, offset, indices in spans:
        if len(indices) > 1 and not (np.diff(indices) > 0).all():
            where = windows[shard].path if windows else dataset.name
            raise GlorocertError(f"{where}: sample indices do not increase, which --ray needs to tell its parts apart; "
                                 "export the data again with `glorocert data export`")
        for start in range(0, len(indices), part_rows):
            kept = indices[start : start + part_rows]
            kept = kept[kept % skip == 0]
            if len(kept):
                parts.append(Part(len(parts), shard, offset + start, offset + min(start + part_rows, len(indices)),
                                  int(kept[0]), int(kept[-1]), len(kept)))
    if not parts:
        raise GlorocertError(f"{dataset.name}: no sample to run (every {skip}th of {dataset.num_samples})")
    return parts


def _manifest(job: Job, dataset: Dataset, parts: list[Part]) -> dict:
    plan = {"part_rows": job.part_rows, "skip": job.skip, "parts": len(parts), "samples": sum(p.rows for p in parts)}
    return jsonable({"format": MANIFEST_FORMAT, "command": job.command, "rows_schema_version": job.schema_version,
                     "parameters": job.identity, "data": dataset.fingerprint(), "plan": plan})


def _run_id(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _claim(out_dir: Path, manifest: dict, resume: bool) -> None:
    """Make ``out_dir`` this run's: record its manifest, or with ``resume`` check the one there."""
    path, rows = out_dir / RUN_MANIFEST, out_dir / ROWS_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise GlorocertError(f"--out {out_dir} exists and is not a directory; with --ray, --out names a directory")
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GlorocertError(f"{path} is unreadable ({e}); choose another --out") from None
        if not resume:
            raise GlorocertError(f"{out_dir} holds the rows of an earlier run ({RUN_MANIFEST}); pass --resume to "
                                 "continue it, or choose another --out")
        if old != manifest:
            raise GlorocertError(f"cannot resume {out_dir}: its rows were made with other settings "
                                 f"({'; '.join(_differences(old, manifest))}); rerun with the same settings, or "
                                 "without --resume into another --out")
        return
    if rows.exists() and any(rows.iterdir()):
        raise GlorocertError(f"{rows} holds files but {out_dir} has no {RUN_MANIFEST}, so they cannot be checked "
                             "against this run; choose another --out")
    write_json(path, manifest)


def _differences(old, new, prefix: str = "") -> list[str]:
    """Each key whose value differs, as ``key old → new`` (nested keys dotted, sha256 shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    if old == new:
        return []
    short = lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else json.dumps(v)  # noqa: E731
    return [f"{prefix.rstrip('.')} {short(old)} → {short(new)}"]


def _part_path(out_dir: Path, part: Part) -> Path:
    return out_dir / ROWS_DIR / f"part-{part.number:05d}.parquet"


def _complete(path: Path, part: Part, run_id: str, skip: int) -> bool:
    """Whether ``path`` holds exactly ``part``'s rows, written by this run (its manifest's id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
        index = pq.read_table(path, columns=["index"]).column("index").to_numpy()
    except (pa.ArrowException, OSError, KeyError):
        return False
    return (metadata.get(b"glorocert.run") == run_id.encode() and len(index) == part.rows
            and int(index[0]) == part.first and int(index[-1]) == part.last
            and bool((np.diff(index) > 0).all()) and not (index % skip).any())


# --------------------------------------------------------------------------- running


def run(job: Job, dataset: Dataset, out_dir: str | os.PathLike, *, address: str | None = None,
        workers: int | None = None, resume: bool = False, progress: Callable[[int], None] | None = None) -> Run:
    """Run ``job`` on every (kept) sample of ``dataset`` on a Ray cluster; the rows, in dataset order.

    ``out_dir`` receives ``_run.json`` at once and each part as it completes (see the module docstring);
    ``workers``: actors in the pool (default: one per CPU of the cluster); ``progress(n)``: n more samples done.
    """
    out_dir = Path(out_dir)
    parts = plan_parts(dataset, job.part_rows, job.skip)
    manifest = _manifest(job, dataset, parts)
    run_id = _run_id(manifest)
    ray = connect(address)
    _claim(out_dir, manifest, resume)
    todo = [p for p in parts if not (resume and _complete(_part_path(out_dir, p), p, run_id, job.skip))]
    if progress and len(todo) < len(parts):
        progress(sum(p.rows for p in parts) - sum(p.rows for p in todo))
    workers = max(1, int(workers or ray.cluster_resources().get("CPU", 1)))
    duplicates = _execute(ray, job, dataset, todo, out_dir, run_id, workers, progress) if todo else 0
    rows = _read_parts(out_dir, parts, run_id, job.skip)
    address = ray.get_runtime_context().gcs_address
    return Run(rows, address, workers, len(parts), len(parts) - len(todo), duplicates)


def _execute(ray, job: Job, dataset: Dataset, todo: list[Part], out_dir: Path, run_id: str, workers: int,
             progress) -> int:
    """Map the parts ``todo`` onto the actor pool and write each as it completes; the duplicates dropped."""
    windows = dataset.shard_windows()
    shipped = {path: (sha256_of(path), ray.put(Path(path).read_bytes())) for path in job.files}
    if windows:
        paths = sorted({windows[p.shard].path for p in todo}, key=str)
        source = ray.data.read_parquet([str(Path(p).resolve()) for p in paths], include_paths=True, num_cpus=0)
        digest = ray.remote(num_cpus=0)(_shard_sha256)
        checks = {p: digest.remote(str(p)) for p in paths}
        verified = _ShardChecks(ray, checks, {w.path: w.sha256 for w in windows})
        locator, blocks = _Locator.of(todo, windows, job.skip), len(paths)
    else:
        tables = list(_blocks(dataset, todo, job))
        source, verified, locator, blocks = ray.data.from_arrow(tables), None, None, len(tables)
    # Ray Data runs each block in one task: more actors than blocks would only start and wait
    results = source.map_batches(
        _Worker, fn_constructor_args=([ray.put((job, shipped, dataset.detached(), locator))],), batch_size=job.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, blocks))), num_cpus=1)
    try:
        return _Collector(todo, out_dir, run_id, job, windows, verified, progress).consume(results)
    except Exception as e:
        raise _unwrapped(e) from None


def _shard_sha256(path: str) -> str:
    return sha256_of(path)


class _ShardChecks:
    """The sha256 of each shard read, computed by a Ray task next to the read: awaited before a part is written."""

    def __init__(self, ray, checks: dict, expected: dict):
        self.ray, self.checks, self.expected, self.passed = ray, checks, expected, set()

    def require(self, path: Path) -> None:
        if path in self.passed:
            return
        if self.ray.get(self.checks[path]) != self.expected[path]:
            raise GlorocertError(f"shard {path} is not the file that was exported (its sha256 differs from the one in "
                                 "its manifest): it was changed or damaged; re-run `glorocert data export`")
        self.passed.add(path)


def _blocks(dataset: Dataset, todo: list[Part], job: Job):
    """The samples of the parts still to do as Arrow tables of ``BLOCK_BATCHES`` batches each (Ray Data's unit of
    work, so that the pool shares a part): the data read here in the plan's parts, checked as in process."""
    import pyarrow as pa

    wanted = {p.first_row: p for p in todo}
    position, rows = 0, BLOCK_BATCHES * job.batch_size
    for batch in dataset.batches(job.part_rows):  # in-memory parts start every part_rows rows of the window
        part = wanted.get(position)
        position += len(batch.index)
        if part is None:
            continue
        keep = np.flatnonzero(batch.index % job.skip == 0)
        for start in range(0, len(keep), rows):
            at = keep[start : start + rows]
            columns = {"index": pa.array(batch.index[at]),
                       "x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(batch.x[at])),
                       PART: pa.array(np.full(len(at), part.number, np.int64))}
            if batch.y is not None:
                columns["label"] = pa.array(batch.y[at])
            yield pa.table(columns)


@dataclass
class _Locator:
    """On a worker: the part each row read from a shard belongs to (-1: outside the window, done, or skipped)."""

    shards: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # resolved path → first, last index and number of its parts
    skip: int

    @classmethod
    def of(cls, todo: list[Part], windows, skip: int) -> _Locator:
        by_shard: dict[str, list[Part]] = {}
        for part in todo:
            by_shard.setdefault(str(Path(windows[part.shard].path).resolve()), []).append(part)
        return cls({path: tuple(np.array([getattr(p, a) for p in parts], np.int64) for a in ("first", "last", "number"))
                    for path, parts in by_shard.items()}, skip)

    def __call__(self, paths: np.ndarray, index: np.ndarray) -> np.ndarray:
        part = np.full(len(index), -1, np.int64)
        nothing = (np.zeros(0, np.int64),) * 3
        for path in np.unique(paths):
            rows = np.flatnonzero(paths == path)
            firsts, lasts, numbers = self.shards.get(str(path), nothing)
            j = np.maximum(np.searchsorted(firsts, index[rows], side="right") - 1, 0)
            inside = (index[rows] >= firsts[j]) & (index[rows] <= lasts[j]) if len(firsts) else np.zeros(len(rows), bool)
            part[rows] = np.where(inside & (index[rows] % self.skip == 0), numbers[j] if len(firsts) else -1, -1)
        return part


class _Localizer:
    """``localize(path)`` on a worker: the file itself where this node reads it unchanged, else a copy of the bytes
    the driver shipped (written once per worker into its own temporary directory, under the same name)."""

    def __init__(self, shipped: dict):
        self.shipped, self.copies = shipped, {}

    def __call__(self, path: str | os.PathLike) -> str:
        path = str(path)
        if path not in self.shipped:
            return path
        sha256, ref = self.shipped[path]
        if Path(path).is_file() and sha256_of(path) == sha256:
            return path
        if path not in self.copies:
            import ray

            copy = Path(tempfile.mkdtemp(prefix="glorocert-")) / Path(path).name
            copy.write_bytes(ray.get(ref))
            self.copies[path] = str(copy)
        return self.copies[path]


class _Worker:
    """A Ray actor: the job's work, built once (it loads the model and the frozen bound), then run on each batch."""

    def __init__(self, payload: list):
        import ray

        # (job, shipped files, detached dataset, locator), put once by the driver and passed by reference: Ray
        # restarts a dead actor from it (the driver owns it, so a lost node does not lose it)
        job, shipped, self.dataset, self.locator = ray.get(payload[0])
        self.job, self.work = job, job.work(_Localizer(shipped))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        part = np.asarray(batch[PART]) if PART in batch else self.locator(batch["path"], np.asarray(batch["index"]))
        keep = part >= 0
        index = np.asarray(batch["index"], np.int64)[keep]
        if not len(index):
            return {PART: part[keep]}
        x = np.array(batch["x"][keep], np.float32).reshape(len(index), *self.dataset.shape)
        if self.locator is not None:  # pixels read from shards on this worker: checked as an in-process read checks them
            paths = batch["path"][keep]
            check_pixels(x, self.dataset.name, lambda i: f"{Path(paths[i]).name}, sample index {int(index[i])}",
                         "as exported")
        y = np.asarray(batch["label"], np.int64)[keep] if "label" in batch else None
        rows = {name: np.asarray(values) for name, values in self.work(Batch(index, x, y)).items()}
        if not np.array_equal(rows.get("index"), index):
            raise RuntimeError(f"{self.job.command}: the per-batch work returned rows for other samples than its batch's")
        rows[PART] = part[keep]
        return rows


class _Collector:
    """The driver's side: rows arrive block by block; a part is written (atomically) once all its samples are in."""

    def __init__(self, todo: list[Part], out_dir: Path, run_id: str, job: Job, windows, checks: _ShardChecks | None,
                 progress):
        self.parts = {p.number: p for p in todo}
        self.chunks: dict[int, list[dict]] = {p.number: [] for p in todo}
        self.seen: dict[int, set] = {p.number: set() for p in todo}
        self.out_dir, self.run_id, self.job, self.windows, self.checks = out_dir, run_id, job, windows, checks
        self.progress, self.duplicates, self.written = progress, 0, set()

    def consume(self, results) -> int:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            numbers = np.asarray(batch[PART])
            for number in np.unique(numbers).tolist():
                rows = numbers == number
                self._add(number, {k: np.asarray(v)[rows] for k, v in batch.items() if k != PART})
        missing = sorted(set(self.parts) - self.written)
        if missing:  # Ray returned every block without them: never seen, but never written as complete either
            raise GlorocertError(f"{len(missing)} part(s) did not receive all their samples (first: part {missing[0]}); "
                                 "rerun with --resume to compute them")
        return self.duplicates

    def _add(self, number: int, chunk: dict[str, np.ndarray]) -> None:
        seen, part = self.seen[number], self.parts[number]
        before = len(seen)
        seen.update(chunk["index"].tolist())
        added = len(seen) - before
        self.duplicates += len(chunk["index"]) - added
        self.chunks[number].append(chunk)
        if len(seen) == part.rows:
            self._write(part, self.chunks.pop(number))
        if self.progress and added:  # after the write: an interrupt here keeps the part
            self.progress(added)

    def _write(self, part: Part, chunks: list[dict]) -> None:
        rows = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        _, first = np.unique(rows["index"], return_index=True)  # in index order; a sample received twice, once
        if self.checks is not None:
            self.checks.require(self.windows[part.shard].path)
        write_rows(_part_path(self.out_dir, part), {name: values[first] for name, values in rows.items()},
                   self.job.schema_version, metadata={"run": self.run_id, "part": part.number})
        self.written.add(part.number)
        self.seen.pop(part.number)


def _read_parts(out_dir: Path, parts: list[Part], run_id: str, skip: int) -> dict[str, np.ndarray]:
    """Every part's rows, checked complete and in order, as one table."""
    tables = []
    for part in parts:
        path = _part_path(out_dir, part)
        if not _complete(path, part, run_id, skip):
            raise GlorocertError(f"{path} is missing or incomplete; rerun with --resume to compute it again")
        tables.append(read_rows(path))
    return {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}


def _unwrapped(error: BaseException) -> BaseException:
    """The GlorocertError a worker raised, out of Ray's wrappers (RayTaskError, UserCodeException); else ``error``."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, GlorocertError) and not type(e).__module__.startswith("ray"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return error
