"""Check certificates against attacks, and bounds against empirical lower bounds.

A certificate says: no input within ``radius`` of x changes the prediction.
The audit tries hard to prove it wrong. Attacks run on the IR — a
differentiable torch copy of the model, checked equal to it at load time —
and every adversarial example found is re-checked on the native model, the
one that was certified:

- the minimum-norm attacks FMN and DDN (foolbox), which look for the nearest
  adversarial example wherever it lies;
- fixed-budget l2 PGD inside each sample's own radius (:func:`l2_pgd`, with
  ``restarts`` random starts).

A **violation** is an input closer than the certified radius whose native
prediction differs; there must be none. Each one is saved as a reproducible
``.npz``. For samples that hold, the audit reports the gap between the
certified radius and the smallest adversarial distance found: how much the
global bound gives away.

Every sample's attacks depend on that sample alone — PGD's random starts come
from a generator seeded by (seed, sample index), FMN and DDN are deterministic
(DDN draws a random direction where a gradient vanishes exactly; its generator
is seeded by (seed, first index) of each group of samples attacked together) —
so the rows do not depend on how the data is cut into batches: a run on a Ray
cluster (:func:`audit_on_ray`) gives the rows and summary of the in-process run.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from glorocert import distributed
from glorocert.api import (ROWS_SCHEMA_VERSION, BatchCertifier, Bound, CertifyWork, Dataset, Model, ModelRecipe,
                           Normalization, resolve_bound)
from glorocert.errors import GlorocertError
from glorocert.files import atomic_write, write_json
from glorocert.graph import Graph

# an adversarial example counts as a violation only when it is closer than the
# radius by more than float noise, and flips the native model's prediction
DISTANCE_RTOL = 1e-6
GROUP = 64  # certified samples attacked together
PGD_REL_STEPSIZE = 0.025  # each PGD step moves 2.5 % of the budget (foolbox's L2PGD default)
PGD_BUDGET = 1 - 1e-3  # PGD searches just inside each certified radius
RAY_PART_ROWS = 1024  # --ray: samples per part (the unit written and resumed)


class IRModule(torch.nn.Module):
    """The IR as a differentiable torch module on [0, 1] pixels, with the normalisation in front."""

    def __init__(self, graph: Graph, normalization: Normalization | None):
        super().__init__()
        self.graph, self.normalization = graph, normalization

    def forward(self, x):
        return self.graph.forward(x if self.normalization is None else self.normalization.apply(x))


@dataclass
class AuditResult:
    audited: int
    violations: list[dict]
    gaps: np.ndarray  # smallest adversarial distance ÷ certified radius, per audited sample (inf: none found)
    summary: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # per sample: index, label, predicted, radius, audited, nearest, violation


def check_parameters(steps: int, restarts: int) -> None:
    """Refuse attack settings that would run no attack and report "violations 0" for nothing."""
    if steps < 1:
        raise GlorocertError(f"--steps must be ≥ 1 (got {steps}): with no attack step nothing is attacked")
    if restarts < 0:
        raise GlorocertError(f"--restarts must be ≥ 0 (got {restarts})")


def _native_predictions(model: Model, x: np.ndarray, normalization: Normalization | None) -> np.ndarray:
    if normalization is not None:
        x = normalization.apply(x)
    return np.asarray(model.runner(x.astype(np.float32))).argmax(axis=1)


def _seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, sample index, restart …)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def l2_pgd(module: torch.nn.Module, x: torch.Tensor, label: torch.Tensor, budget: np.ndarray, steps: int,
           seeds: list[int]) -> torch.Tensor:
    """Fixed-budget l2 PGD (Madry et al.; foolbox's L2PGD, with a budget per sample): a random start uniform in each
    sample's ball of radius ``budget[i]`` (its generator seeded by ``seeds[i]``), then ``steps`` steps of
    ``PGD_REL_STEPSIZE·budget`` along the normalised gradient of the cross-entropy of ``label``, each projected
    back onto the ball and into [0, 1]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    eps = torch.as_tensor(budget, dtype=x.dtype).view(shape)
    start = []
    for seed, sample in zip(seeds, x):
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(sample.shape, generator=generator, dtype=x.dtype)
        length = torch.rand((), generator=generator, dtype=x.dtype) ** (1.0 / sample.numel())
        start.append(direction / direction.norm().clamp_min(1e-12) * length)
    adversarial = (x + torch.stack(start) * eps).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(adversarial), label, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, adversarial)
        step = gradient / gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        delta = adversarial.detach() + PGD_REL_STEPSIZE * eps * step - x
        delta = delta * torch.clamp(eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape), max=1.0)
        adversarial = (x + delta).clamp(0, 1)
    return adversarial.detach()


class BatchAuditor:
    """audit's per-batch work: certify the batch (ε = 0), then attack each certified sample inside its radius; per
    sample ``index, label, predicted, radius, audited, nearest`` (the closest native-verified adversarial example
    found, inf when none), ``violation`` and ``adversarial`` (the violation's ``.npz`` bytes, empty when none)."""

    def __init__(self, model: Model, certifier: BatchCertifier, normalization: Normalization | None, steps: int,
                 restarts: int, seed: int):
        import foolbox as fb

        self.model, self.certifier, self.normalization = model, certifier, normalization
        self.steps, self.restarts, self.seed = steps, restarts, seed
        self.module = IRModule(model.graph, normalization).eval()
        self.fmodel = fb.PyTorchModel(self.module, bounds=(0.0, 1.0))
        self.minimum_norm = [fb.attacks.L2FMNAttack(steps=steps), fb.attacks.DDNAttack(steps=steps)]

    def __call__(self, batch) -> dict[str, np.ndarray]:
        certified = self.certifier(batch)
        rows = {k: certified[k] for k in ("index", "label", "predicted", "radius")}
        n = len(batch.index)
        audited = (rows["radius"] > 0) & np.isfinite(rows["radius"])  # certified at some radius > 0
        rows.update(audited=audited, nearest=np.full(n, np.inf), violation=np.zeros(n, bool),
                    adversarial=np.array([b""] * n, dtype=object))
        chosen = np.flatnonzero(audited)
        for start in range(0, len(chosen), GROUP):
            self._attack(batch.x, rows, chosen[start : start + GROUP])
        return rows

    def _attack(self, x_all: np.ndarray, rows: dict, at: np.ndarray) -> None:
        """Every attack on the samples ``at`` of the batch; the nearest adversarial example re-checked on the native
        model, and the closest violation of each sample, go into ``rows``."""
        x, index, radius = x_all[at], rows["index"][at], rows["radius"][at]
        predicted = rows["predicted"][at]
        torch.manual_seed(_seed(self.seed, index[0]))  # DDN's random directions (where a gradient vanishes)
        xt, label = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(predicted).long()
        candidates = [attack(self.fmodel, xt, label, epsilons=None)[1] for attack in self.minimum_norm]
        candidates += [l2_pgd(self.module, xt, label, radius * PGD_BUDGET, self.steps,
                              [_seed(self.seed, i, r) for i in index]) for r in range(self.restarts)]
        for adversarial in candidates:
            adv = adversarial.detach().numpy().astype(np.float32)
            distance = np.linalg.norm((adv - x).reshape(len(at), -1).astype(np.float64), axis=1)
            flipped = _native_predictions(self.model, adv, self.normalization) != predicted
            closer = flipped & (distance < rows["nearest"][at])
            rows["nearest"][at[closer]] = distance[closer]
            for k in np.flatnonzero(closer & (distance < radius * (1 - DISTANCE_RTOL))):
                rows["violation"][at[k]] = True
                rows["adversarial"][at[k]] = _npz(x[k], adv[k], radius[k], distance[k], predicted[k])


def _npz(x, adversarial_x, radius, distance, predicted) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, adversarial_x=adversarial_x, radius=radius, distance=distance, predicted=predicted)
    return buffer.getvalue()


def _unpacked(npz: bytes) -> dict:
    with np.load(io.BytesIO(npz)) as stored:
        return {key: stored[key][()] for key in stored.files}  # 0-d arrays as scalars


def audit(
    model: Model,
    dataset: Dataset,
    *,
    bound: Bound | str | Path | None = None,
    steps: int = 100,
    restarts: int = 2,
    seed: int = 0,
    out_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Attack every certified sample inside its radius; report violations (must be none) and radius gaps."""
    check_parameters(steps, restarts)
    bound, source = resolve_bound(model, bound, dataset.normalization)
    certifier = BatchCertifier(model, dataset, bound, source, [0.0])
    auditor = BatchAuditor(model, certifier, dataset.normalization, steps, restarts, seed)
    parts = []
    for batch in dataset.batches(256):
        parts.append(auditor(batch))
        if progress:
            progress(len(batch.index))
    rows = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return audit_result(rows, dataset.name, model, bound.mode, steps, restarts, seed, out_dir)


def audit_result(rows: dict, dataset_name: str, model: Model, bound_mode: str, steps: int, restarts: int, seed: int,
                 out_dir: Path | None, **extra) -> AuditResult:
    """The audit's summary and violations, from its rows; ``audit.json`` and the violations' ``.npz`` in ``out_dir``."""
    audited = rows["audited"].astype(bool)
    best, radius = rows["nearest"][audited], rows["radius"][audited]
    gaps = best / radius
    found = np.isfinite(gaps)
    violations = [{"index": int(rows["index"][k]), **_unpacked(rows["adversarial"][k])} for k in np.flatnonzero(rows["violation"])]
    summary = {
        "dataset": dataset_name, "model": str(model.path), "bound_mode": bound_mode,
        "samples": int(len(rows["index"])), "audited": int(audited.sum()), "violations": len(violations),
        "attacks": ["L2FMN", "DDN", f"L2PGD×{restarts} at the certified radius"], "steps": steps, "seed": seed,
        "adversarial_found": int(found.sum()),
        "median_gap_ratio": float(np.median(gaps[found])) if found.any() else None,
        "median_gap": float(np.median((best - radius)[found])) if found.any() else None,
        "gap_ratio_quantiles": {q: float(np.quantile(gaps[found], q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if found.any() else None,
        **extra,
    }
    if not audited.any():
        summary["note"] = "no sample is certified"
    if out_dir:
        _write_outputs(Path(out_dir), summary, violations)
    return AuditResult(int(audited.sum()), violations, gaps, summary, rows)


@dataclass(frozen=True)
class AuditWork:
    """audit's per-batch work on a Ray worker: the model loaded once (with its IR: attacks need it), the driver's
    bound, a :class:`BatchAuditor`."""

    certify: CertifyWork
    steps: int
    restarts: int
    seed: int

    def __call__(self, localize) -> BatchAuditor:
        certifier = self.certify(localize)
        return BatchAuditor(certifier.model, certifier, self.certify.dataset.normalization, self.steps, self.restarts,
                            self.seed)


def audit_on_ray(model: Model, recipe: ModelRecipe, dataset: Dataset, out_dir: Path, *,
                 bound: Bound | str | Path | None = None, steps: int = 100, restarts: int = 2, seed: int = 0,
                 address: str | None = None, workers: int | None = None, resume: bool = False,
                 progress: Callable[[int], None] | None = None) -> AuditResult:
    """:func:`audit` on a Ray cluster (glorocert/distributed.py): rows as Parquet parts under ``out_dir``, resumable,
    equal to the in-process rows; the summary equals the in-process one, with ``distributed`` added."""
    check_parameters(steps, restarts)
    bound, source = resolve_bound(model, bound, dataset.normalization)
    work = AuditWork(CertifyWork(recipe, bound, source, dataset.detached(), [0.0]), steps, restarts, seed)
    identity = {"model_sha256": model.sha256, "bound_sha256": bound.to_json()["content_sha256"], "steps": steps,
                "restarts": restarts, "seed": seed}
    job = distributed.Job("audit", work, identity, GROUP, RAY_PART_ROWS, files=recipe.files,
                          schema_version=ROWS_SCHEMA_VERSION)
    started = time.perf_counter()
    run = distributed.run(job, dataset, out_dir, address=address, workers=workers, resume=resume, progress=progress)
    return audit_result(run.rows, dataset.name, model, bound.mode, steps, restarts, seed, out_dir,
                        seconds=time.perf_counter() - started, distributed=run.report())


def _write_outputs(out_dir: Path, summary: dict, violations: list[dict]) -> None:
    """Each violation as a reproducible .npz, and audit.json."""
    for v in violations:
        with atomic_write(out_dir / f"violation-{v['index']}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=v["x"], adversarial_x=v["adversarial_x"], radius=v["radius"], distance=v["distance"], predicted=v["predicted"])
    write_json(out_dir / "audit.json", {**summary, "violation_list": [{k: v[k] for k in ("index", "radius", "distance", "predicted")} for v in violations]})
