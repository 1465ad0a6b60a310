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

:func:`lipschitz_lower_bounds` maximises local Jacobian norms of f and of
every margin y_j − y_i by gradient ascent; any value found is a lower bound on
the true constants, so upper ÷ lower brackets the bound's looseness (GloRo
paper, Fig. 4c).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from glorocert.api import certify, normalization_of
from glorocert.data import Dataset
from glorocert.errors import GlorocertError
from glorocert.graph import Graph
from glorocert.lipschitz.boundfile import Bound
from glorocert.loaders import Model
from glorocert.results import atomic_write, write_json

# an adversarial example counts as a violation only when it is closer than the
# radius by more than float noise, and flips the native model's prediction
DISTANCE_RTOL = 1e-6


class IRModule(torch.nn.Module):
    """The IR as a float32 torch module (weights cast once), with normalisation in front."""

    def __init__(self, graph: Graph, normalization: dict | None):
        super().__init__()
        self.graph = graph
        view = (1, -1) + (1,) * (len(graph.input_shape) - 1)
        norm = normalization or {"mean": [0.0], "std": [1.0]}
        self.register_buffer("mean", torch.tensor(norm["mean"], dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(norm["std"], dtype=torch.float32).view(view))

    def forward(self, x):
        return self.graph.forward((x - self.mean) / self.std)


@dataclass
class AuditResult:
    audited: int
    violations: list[dict]
    gaps: np.ndarray  # smallest adversarial distance ÷ certified radius, per audited sample (inf: none found)
    summary: dict = field(default_factory=dict)


def _native_predictions(model: Model, x: np.ndarray, normalization: dict | None) -> np.ndarray:
    if normalization:
        view = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - np.asarray(normalization["mean"], np.float32).reshape(view)) / np.asarray(normalization["std"], np.float32).reshape(view)
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
    import foolbox as fb

    result = certify(model, dataset, [0.0], bound=bound)
    rows = result.rows
    normalization = normalization_of(dataset.mean, dataset.std)
    fmodel = fb.PyTorchModel(IRModule(model.graph, normalization).eval(), bounds=(0.0, 1.0))
    # the inputs of the certified samples (certified at some radius > 0)
    keep = (rows["radius"] > 0) & np.isfinite(rows["radius"])
    wanted = set(rows["index"][keep].tolist())
    xs, idx = [], []
    for batch in dataset.batches(256):
        mask = np.isin(batch.index, list(wanted))
        xs.append(batch.x[mask])
        idx.append(batch.index[mask])
    if not wanted:
        return AuditResult(0, [], np.zeros(0), {"audited": 0, "violations": 0, "note": "no sample is certified"})
    x_all = np.concatenate(xs)
    index = np.concatenate(idx)
    position = {int(i): k for k, i in enumerate(rows["index"])}
    predicted = np.array([rows["predicted"][position[int(i)]] for i in index])
    radius = np.array([rows["radius"][position[int(i)]] for i in index])

    torch.manual_seed(seed)
    best = np.full(len(index), np.inf)  # smallest adversarial distance found (native-verified)
    violations: list[dict] = []
    attacks = [fb.attacks.L2FMNAttack(steps=steps), fb.attacks.DDNAttack(steps=steps)]
    pgd = fb.attacks.L2PGD(steps=steps, random_start=True)
    for start in range(0, len(index), 64):
        sl = slice(start, start + 64)
        x = torch.from_numpy(x_all[sl])
        y = torch.from_numpy(predicted[sl]).long()
        r = radius[sl]
        candidates = []
        for attack in attacks:
            _, adv, _ = attack(fmodel, x, y, epsilons=None)
            candidates.append(adv)
        # fixed budget: just inside each radius (groups share the smallest radius of the group: never outside any)
        budget = float(np.min(r)) * (1 - 1e-3)
        for _ in range(restarts):
            _, adv, _ = pgd(fmodel, x, y, epsilons=budget)
            candidates.append(adv)
        for adv in candidates:
            adv_np = adv.detach().numpy().astype(np.float32)
            dist = np.linalg.norm((adv_np - x_all[sl]).reshape(len(r), -1).astype(np.float64), axis=1)
            flipped = _native_predictions(model, adv_np, normalization) != predicted[sl]
            found = flipped & (dist < best[sl])
            best[sl] = np.where(found, dist, best[sl])
            for k in np.flatnonzero(flipped & (dist < r * (1 - DISTANCE_RTOL))):
                violations.append({
                    "index": int(index[sl][k]), "radius": float(r[k]), "distance": float(dist[k]),
                    "predicted": int(predicted[sl][k]), "adversarial_x": adv_np[k], "x": x_all[sl][k],
                })
        if progress:
            progress(len(r))
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
        out_dir = Path(out_dir)
        for v in violations:
            with atomic_write(out_dir / f"violation-{v['index']}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, x=v["x"], adversarial_x=v["adversarial_x"], radius=v["radius"], distance=v["distance"], predicted=v["predicted"])
        write_json(out_dir / "audit.json", {**summary, "violation_list": [{k: v[k] for k in ("index", "radius", "distance", "predicted")} for v in violations]})
    return AuditResult(len(index), violations, gaps, summary)


def lipschitz_lower_bounds(
    graph: Graph, samples: torch.Tensor, *, steps: int = 50, seed: int = 0, normalization: dict | None = None
) -> dict:
    """Empirical lower bounds: max over x (started at ``samples``) of ‖J_f(x)‖₂ and of ‖∇(y_j − y_i)(x)‖₂.

    Every value is attained at some x, so each is ≤ the true Lipschitz constant.
    """
    if samples.numel() == 0:
        raise GlorocertError("no samples to start the lower-bound search from")
    module = IRModule(graph, normalization).double()
    gen = torch.Generator().manual_seed(seed)
    x = samples.double().clone()
    c = graph.num_classes
    # margin: maximise ‖∇(y_j − y_i)‖ for every pair at once (one pair per copy of x)
    pairs = [(j, i) for j in range(c) for i in range(c) if i != j]
    margin_lower = np.zeros((c, c))
    start = x[torch.randint(len(x), (len(pairs),), generator=gen)]
    z = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=0.01)
    sel_j = torch.tensor([p[0] for p in pairs])
    sel_i = torch.tensor([p[1] for p in pairs])
    for _ in range(steps):
        out = module(z)
        diff = out[torch.arange(len(pairs)), sel_j] - out[torch.arange(len(pairs)), sel_i]
        (grad,) = torch.autograd.grad(diff.sum(), z, create_graph=True)
        norms = grad.flatten(1).norm(dim=1)
        for k, (j, i) in enumerate(pairs):
            margin_lower[j, i] = max(margin_lower[j, i], norms[k].item())
        optimiser.zero_grad()
        (-norms.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            z.clamp_(-0.5, 1.5)
    # global: ‖J_f(x)‖₂ by power iteration on JᵀJ at each start point
    global_lower = 0.0
    for point in x[: min(len(x), 32)]:
        point = point[None]
        v = torch.randn(point.shape, generator=gen, dtype=torch.float64)
        for _ in range(30):
            v = v / v.norm()
            _, jv = torch.func.jvp(module, (point,), (v,))
            _, pull = torch.func.vjp(module, point)
            (v,) = pull(jv)
        v = v / v.norm()
        _, jv = torch.func.jvp(module, (point,), (v,))
        global_lower = max(global_lower, jv.norm().item())
    return {"global_lower": max(global_lower, float(margin_lower.max()) / np.sqrt(2)), "margin_lower": margin_lower.tolist()}
