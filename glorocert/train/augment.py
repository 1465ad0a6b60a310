"""Data augmentation for certified training: random translations.

Certified training fits a net whose margin must hold on a whole l2 ball, which uses capacity a plain net
spends on fitting; with few samples (mnist-5k: 4,000) it overfits, and the held-out VRA, not the training
one, is what counts. Small random shifts are the augmentation of the GloRo and LiResNet scripts (random
crops with padding, Leino et al. 2021; Hu et al. 2023) that keeps a digit a digit (no flips, no colour).
The draws come from a generator seeded by (seed, epoch), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation stream of one epoch (independent of the shuffle's and the smoothing noise's)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 700_000_001)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own (dy, dx) ∈ [−max_shift, max_shift]², zeros shifted in (a crop of the
    zero-padded image)."""
    if max_shift <= 0:
        return x
    n, _, height, width = x.shape
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (max_shift,) * 4)
    rows = offsets[0][:, None] + torch.arange(height, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(width, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
