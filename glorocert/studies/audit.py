"""Check certificates against attacks, and bounds against empirical lower bounds.

A certificate says: no input within ``radius`` of x changes the prediction.
The audit tries hard to prove it wrong. Attacks (foolbox: the minimum-norm
FMN and DDN attacks, and fixed-budget PGD inside each radius, with random
restarts, seeded) run on the IR — a differentiable torch copy of the model,
checked equal to it at load time — and every adversarial example found is
re-checked on the native model, the one that was certified. A **violation**
is an input closer than the certified radius whose native prediction
differs; there must be none. Each one is saved as a reproducible ``.npz``.

For samples that hold, the audit reports the gap between the certified
radius and the smallest adversarial distance found: how much the global
bound gives away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from glorocert.api import Bound, Dataset, Model, Normalization, certify
from glorocert.errors import GlorocertError
from glorocert.files import atomic_write, write_json
from glorocert.graph import Graph

# an adversarial example counts as a violation only when it is closer than the
# radius by more than float noise, and flips the native model's prediction
DISTANCE_RTOL = 1e-6


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
    result = certify(model, dataset, [0.0], bound=bound)
    rows = result.rows
    keep = (rows["radius"] > 0) & np.isfinite(rows["radius"])  # certified at some radius > 0
    if not keep.any():
        return AuditResult(0, [], np.zeros(0), {"audited": 0, "violations": 0, "note": "no sample is certified"})
    x_all, index = _inputs_of(dataset, set(rows["index"][keep].tolist()))
    position = {int(i): k for k, i in enumerate(rows["index"])}
    predicted = np.array([rows["predicted"][position[int(i)]] for i in index])
    radius = np.array([rows["radius"][position[int(i)]] for i in index])
    torch.manual_seed(seed)
    best, violations = _attack(model, dataset.normalization, x_all, index, predicted, radius, steps, restarts, progress)
    gaps = best / radius
    found = np.isfinite(gaps)
    summary = {
        "dataset": dataset.name, "model": str(model.path), "bound_mode": result.bound.mode,
        "samples": int(len(rows["index"])), "audited": int(len(index)), "violations": len(violations),
        "attacks": ["L2FMN", "DDN", f"L2PGD×{restarts} at the certified radius"], "steps": steps, "seed": seed,
        "adversarial_found": int(found.sum()),
        "median_gap_ratio": float(np.median(gaps[found])) if found.any() else None,
        "median_gap": float(np.median((best - radius)[found])) if found.any() else None,
        "gap_ratio_quantiles": {q: float(np.quantile(gaps[found], q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if found.any() else None,
    }
    if out_dir:
        _write_outputs(Path(out_dir), summary, violations)
    return AuditResult(len(index), violations, gaps, summary)


def _inputs_of(dataset: Dataset, wanted: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of the samples whose index is in ``wanted``, in dataset order, with their indices."""
    xs, idx = [], []
    for batch in dataset.batches(256):
        mask = np.isin(batch.index, list(wanted))
        xs.append(batch.x[mask])
        idx.append(batch.index[mask])
    return np.concatenate(xs), np.concatenate(idx)


def _attack(model, normalization, x_all, index, predicted, radius, steps, restarts, progress):
    """FMN, DDN and PGD inside each radius on the IR, re-checked on the native model, in groups of 64.
    Returns (smallest native-verified adversarial distance per sample, the violations)."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(IRModule(model.graph, normalization).eval(), bounds=(0.0, 1.0))
    best = np.full(len(index), np.inf)
    violations: list[dict] = []
    minimum_norm = [fb.attacks.L2FMNAttack(steps=steps), fb.attacks.DDNAttack(steps=steps)]
    pgd = fb.attacks.L2PGD(steps=steps, random_start=True)
    for start in range(0, len(index), 64):
        sl = slice(start, start + 64)
        x, y, r = torch.from_numpy(x_all[sl]), torch.from_numpy(predicted[sl]).long(), radius[sl]
        candidates = [attack(fmodel, x, y, epsilons=None)[1] for attack in minimum_norm]
        # fixed budget: just inside each radius (groups share the smallest radius of the group: never outside any)
        budget = float(np.min(r)) * (1 - 1e-3)
        candidates += [pgd(fmodel, x, y, epsilons=budget)[1] for _ in range(restarts)]
        for adv in candidates:
            adv_np = adv.detach().numpy().astype(np.float32)
            dist = np.linalg.norm((adv_np - x_all[sl]).reshape(len(r), -1).astype(np.float64), axis=1)
            flipped = _native_predictions(model, adv_np, normalization) != predicted[sl]
            best[sl] = np.where(flipped & (dist < best[sl]), dist, best[sl])
            for k in np.flatnonzero(flipped & (dist < r * (1 - DISTANCE_RTOL))):
                violations.append({
                    "index": int(index[sl][k]), "radius": float(r[k]), "distance": float(dist[k]),
                    "predicted": int(predicted[sl][k]), "adversarial_x": adv_np[k], "x": x_all[sl][k],
                })
        if progress:
            progress(len(r))
    return best, violations


def _write_outputs(out_dir: Path, summary: dict, violations: list[dict]) -> None:
    """Each violation as a reproducible .npz, and audit.json."""
    for v in violations:
        with atomic_write(out_dir / f"violation-{v['index']}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=v["x"], adversarial_x=v["adversarial_x"], radius=v["radius"], distance=v["distance"], predicted=v["predicted"])
    write_json(out_dir / "audit.json", {**summary, "violation_list": [{k: v[k] for k in ("index", "radius", "distance", "predicted")} for v in violations]})
