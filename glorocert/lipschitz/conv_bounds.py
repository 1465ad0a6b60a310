"""Guaranteed upper bounds on the spectral norm of a zero-padded convolution, without materialising it.

Notation. A ``Conv2d`` with kernel K (C_out × C_in/groups × k_h × k_w), stride s, dilation d, groups g and
zero padding (t, b, l, r) maps an input x ∈ R^{C_in×H×W} to y = A x. Write L_h = t + H + b for the padded
height, k_e = (k − 1)·d + 1 for the effective kernel extent, and out_h = ⌊(L_h − k_e)/s⌋ + 1 (likewise in w).

**1. The torus (Sedghi et al. 2019, extended to stride, dilation, groups).** Groups make one dense kernel
that is block diagonal in the channels; dilation makes a sparse kernel of extent k_e. Place the input at
rows t … t+H−1 of a torus of N_h = s·⌈L_h/s⌉ rows (zeros elsewhere) and run the *circular* stride-s
convolution C there. Every window of A reads padded rows 0 … L_h−1 < N_h, none wraps around, so each
output of A is an output of C: A = P C E with E the zero embedding (an isometry) and P the selection of
the out_h × out_w outputs (a coordinate projection; out_h ≤ N_h/s, so no two outputs of A coincide).
The polyphase split Π (input row s·a + p → phase channel p, row a) is a permutation and turns C into a
stride-1 circular convolution C' on the torus of m_h = N_h/s rows, with C_in·s_h·s_w input channels:
A = P C' Π E. The 2-D DFT block-diagonalises C': at each of the m_h·m_w frequencies ω it multiplies the
channel vector by the C_out × C_in·s² matrix K̂(ω). Write σ(ω) for its largest singular value. For a real
kernel K̂(−ω) = conj K̂(ω), so σ is even, σ(−ω) = σ(ω), and the half plane (``rfft2``) gives all of it.

**2. ``circulant``: ‖A‖ ≤ max_ω σ(ω).** ‖A‖ ≤ ‖C'‖ (E isometric, Π orthogonal, P a projection), and
‖C'‖ = max_ω σ(ω) exactly (Parseval: the unitary DFT block-diagonalises C').

**3. ``circulant-box``: ‖A‖² ≤ λ_max(T_B), B the smaller of the input and output boxes.** Let T be the
scalar circular convolution on the m_h × m_w torus whose eigenvalues are σ(ω)², i.e. T z = h ⊛ z with
h = IDFT(σ²) (real and even, since σ² is). For a box B = {0…a−1} × {0…c−1} of the torus let T_B be
the principal submatrix of T on B (entries h(i−i', j−j'), indices mod m), a symmetric (a·c)² matrix.

*Input side.* z = Π E x has C_in·s² channels z_q, each supported in a box of at most
b_in = ⌈H/s_h⌉ × ⌈W/s_w⌉ (the rows of one phase inside the input's rows). With ẑ_q the unnormalised DFT
and M = m_h·m_w, Parseval gives
    ‖A x‖² ≤ ‖C' z‖² = (1/M) Σ_ω ‖K̂(ω) ẑ(ω)‖² ≤ (1/M) Σ_ω σ(ω)² Σ_q |ẑ_q(ω)|² = Σ_q z_qᵀ T z_q.
T commutes with translations, so z_qᵀ T z_q = z'ᵀ T_{b_in} z' for z_q translated into the box b_in at the
origin, and z'ᵀ T_{b_in} z' ≤ λ_max(T_{b_in}) ‖z_q‖². Summed over q: ‖A x‖² ≤ λ_max(T_{b_in}) ‖x‖².
*Output side.* ‖A‖ = ‖Aᵀ‖ and ‖Aᵀ y‖ = ‖Eᵀ Πᵀ C'ᵀ Pᵀ y‖ ≤ ‖C'ᵀ w‖ with w = Pᵀ y, each of whose C_out
channels lies in the out_h × out_w box; C'ᵀ has the symbol K̂(ω)ᴴ, with the same σ(ω), so the same
argument gives ‖A‖² ≤ λ_max(T_{b_out}).
Both are at most the circulant bound: T_B is a principal submatrix of T, whose largest eigenvalue is
max σ² (Cauchy interlacing). A box inside another (both at the origin) is a principal submatrix of it,
so only the smaller of two nested boxes is solved; a box with more than ``BOX_MAX_SIDE`` cells is
replaced by the strip that spans the whole torus in one direction (a larger set, so still a valid
bound): T restricted to a strip is block-diagonalised by the DFT along the strip, one small Hermitian
matrix per frequency. What this loses against the exact norm is only σ(ω)² ⪰ K̂ᴴK̂(ω): the channel
direction of the top singular vector turning with ω; the finite extent of the input, which is what
separates a zero-padded from a circular convolution, is kept.

**Not used, and why.** *Gram iteration* (Delattre et al., ICML 2023): for G = K̂ᴴK̂(ω) and t ≥ 0,
‖G^{2^t}‖_F ≥ λ_max(G)^{2^t}, so σ(ω) ≤ ‖G^{2^t}‖_F^{1/2^{t+1}}, a guaranteed bound that falls to σ(ω)
as t grows; per frequency it is never below the exact σ(ω) that (2) uses, so never tighter than (2).
*Zero padding by Gram iteration on the kernel* (Delattre et al., ICML 2024, "Spectral norm of
convolutional layers with circular and zero paddings"): it bounds the convolution on the infinite plane
ℤ² (of which the zero-padded one is a restriction), whose norm is sup over all real ω of σ(ω), at least
the maximum over the torus' grid: never tighter than (2) either. Both are faster than an SVD per
frequency, not tighter; the gap that matters, circular vs zero-padded, is what (3) closes.

**4. Residual blocks, x ↦ x + A x, as one convolution.** With stride 1, C_out = C_in and padding that keeps
the size (t + b = k_e,h − 1, l + r = k_e,w − 1), output (i, j) of A reads padded rows i … i + k_e,h − 1, and
padded row i + t is input row i. So the identity is the convolution whose dense kernel is I (in the
channels) at tap (t, l) and zero elsewhere, with the same padding, and I + A is exactly the convolution
with the dense kernel K + I·δ_(t,l) (:func:`identity_plus`). Sections 1–3 then bound ‖I + A‖ as they bound
any convolution: no 1 + ‖A‖ product, and the same finite-extent argument.

Rounding: the DFT, LAPACK's SVD and its symmetric eigensolver are backward stable; all three perturb the
result by O(u·n) relative, under 1e-10 here, which the caller's FLOAT_MARGIN (1e-6) covers.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from glorocert.graph import Conv2d

BOX_MAX_SIDE = 1_024  # box eigenproblems up to 32×32 cells (8 MB, a fraction of a second); larger → strips


def dense_kernel(conv: Conv2d) -> torch.Tensor:
    """The kernel as one dense float64 (C_out, C_in, k_e_h, k_e_w) tensor: groups block-diagonal, dilation sparse."""
    weight = conv.weight.to(torch.float64)
    c_out, c_in_group, kh, kw = weight.shape
    groups, (dh, dw) = conv.groups, conv.dilation
    dense = torch.zeros(c_out, c_in_group * groups, (kh - 1) * dh + 1, (kw - 1) * dw + 1, dtype=torch.float64)
    per_group = c_out // groups
    for g in range(groups):
        rows, cols = slice(g * per_group, (g + 1) * per_group), slice(g * c_in_group, (g + 1) * c_in_group)
        dense[rows, cols, ::dh, ::dw] = weight[rows]
    return dense


def identity_plus(conv: Conv2d, in_shape: tuple[int, ...]) -> Conv2d | None:
    """The convolution equal to x ↦ x + conv(x) (homogeneous part), or None where the identity is no tap of
    the kernel: stride ≠ 1, C_out ≠ C_in, or an output of another size (section 4)."""
    dense = dense_kernel(conv)
    c_out, c_in, kh_e, kw_e = dense.shape
    t, b, l, r = conv.padding
    if conv.stride != (1, 1) or c_out != c_in or c_in != in_shape[0] or t + b != kh_e - 1 or l + r != kw_e - 1:
        return None
    channels = torch.arange(c_in)
    dense[channels, channels, t, l] += 1.0
    return Conv2d(dense, None, (1, 1), conv.padding, (1, 1), 1)


def torus(conv: Conv2d, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(m_h, m_w): the polyphase torus, N/s, of the circular convolution that contains ``conv`` (section 1)."""
    _, h, w = in_shape
    t, b, l, r = conv.padding
    (sh, sw) = conv.stride
    return -(-(h + t + b) // sh), -(-(w + l + r) // sw)


def top_singular_values(conv: Conv2d, in_shape: tuple[int, ...]) -> torch.Tensor:
    """σ(ω) on the half plane of the torus' frequencies: shape (m_h, m_w // 2 + 1), float64."""
    dense = dense_kernel(conv)
    c_out, c_in, kh_e, kw_e = dense.shape
    (sh, sw) = conv.stride
    mh, mw = torus(conv, in_shape)
    ah, aw = -(-kh_e // sh), -(-kw_e // sw)
    padded = F.pad(dense, (0, aw * sw - kw_e, 0, ah * sh - kh_e))
    # polyphase: tap (s·a + p) of the kernel reads phase p at offset a
    poly = padded.reshape(c_out, c_in, ah, sh, aw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * sh * sw, ah, aw)
    symbols = torch.fft.rfft2(poly, s=(mh, mw)).permute(2, 3, 0, 1)  # (m_h, m_w//2+1, c_out, c_in·s²)
    return _largest_singular_values(symbols.reshape(-1, *symbols.shape[2:])).reshape(symbols.shape[:2])


def _largest_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """σ_max of each matrix of a batch (LAPACK's SVD), the batch split over torch's threads: a batched SVD of
    small matrices runs them one after another, so the split halves the time on two cores."""
    chunks = matrices.chunk(max(1, min(torch.get_num_threads(), len(matrices) // 64)))
    if len(chunks) == 1:
        return torch.linalg.svdvals(matrices)[:, 0]
    with ThreadPoolExecutor(len(chunks)) as pool:
        return torch.cat([values[:, 0] for values in pool.map(torch.linalg.svdvals, chunks)])


def circulant_bound(conv: Conv2d, in_shape: tuple[int, ...]) -> float:
    """‖conv‖ ≤ max_ω σ(ω): the norm of the circular convolution that contains it (section 2)."""
    return top_singular_values(conv, in_shape).max().item()


def boxes(conv: Conv2d, in_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The input (per phase) and output boxes of section 3, the larger of two nested ones dropped."""
    _, h, w = in_shape
    t, b, l, r = conv.padding
    (sh, sw) = conv.stride
    kh_e, kw_e = ((k - 1) * d + 1 for k, d in zip(conv.weight.shape[2:], conv.dilation))
    box_in = (-(-h // sh), -(-w // sw))
    box_out = ((h + t + b - kh_e) // sh + 1, (w + l + r - kw_e) // sw + 1)
    if box_in[0] <= box_out[0] and box_in[1] <= box_out[1]:
        return [box_in]
    if box_out[0] <= box_in[0] and box_out[1] <= box_in[1]:
        return [box_out]
    return [box_in, box_out]


def box_eigenvalue(sigma2_half: torch.Tensor, shape: tuple[int, int], box: tuple[int, int], max_side: int) -> float:
    """λ_max of T restricted to ``box`` (or, above ``max_side`` cells, to the better of its two strips)."""
    mh, mw = shape
    a, c = box
    if a * c <= max_side:
        h = torch.fft.irfft2(sigma2_half, s=(mh, mw))  # T's kernel: real and even
        di = (torch.arange(a)[:, None] - torch.arange(a)[None, :]) % mh
        dj = (torch.arange(c)[:, None] - torch.arange(c)[None, :]) % mw
        block = h[di[:, None, :, None], dj[None, :, None, :]].reshape(a * c, a * c)
        return torch.linalg.eigvalsh((block + block.T) / 2)[-1].item()
    return min(_strip_eigenvalue(sigma2_half, shape, a, along_rows=True),
               _strip_eigenvalue(sigma2_half, shape, c, along_rows=False))


def _strip_eigenvalue(sigma2_half: torch.Tensor, shape: tuple[int, int], width: int, along_rows: bool) -> float:
    """λ_max of T on a strip ``width`` cells wide and the whole torus long: max over the strip's frequencies."""
    mh, mw = shape
    full = torch.fft.irfft2(sigma2_half, s=(mh, mw))  # T's kernel h: real and even
    if along_rows:  # rows 0…width−1, every column: diagonalised by the DFT along the columns
        per_frequency = torch.fft.fft(full, dim=1).T  # (m_w, m_h): symbol in w, kernel in h
        size = mh
    else:
        per_frequency = torch.fft.fft(full, dim=0)  # (m_h, m_w)
        size = mw
    idx = (torch.arange(width)[:, None] - torch.arange(width)[None, :]) % size
    blocks = per_frequency[:, idx]  # (frequencies, width, width), Hermitian
    blocks = (blocks + blocks.mH) / 2
    return torch.linalg.eigvalsh(blocks)[:, -1].max().item()


def conv_upper_bound(conv: Conv2d, in_shape: tuple[int, ...], max_side: int = BOX_MAX_SIDE) -> tuple[float, str]:
    """min(circulant, circulant-box) and the method that gave it (module docstring)."""
    sigma = top_singular_values(conv, in_shape)
    circulant = sigma.max().item()
    shape = torus(conv, in_shape)
    boxed = min(box_eigenvalue(sigma * sigma, shape, box, max_side) for box in boxes(conv, in_shape))
    boxed = math.sqrt(max(boxed, 0.0))
    return (boxed, "circulant-box") if boxed < circulant else (circulant, "circulant")
