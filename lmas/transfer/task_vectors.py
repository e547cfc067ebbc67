"""Merges of task vectors (per module ``τ_i = ΔW_i``, dense (out, in) matrices) as the merging toolkits define them.

Pure functions; :func:`lmas.transfer.merge.merge_adapters` applies them to agents' whole updates and factors the
result back into LoRA factors (a truncated SVD when the merge's rank exceeds the target's; the error reported).

* **Breadcrumbs** (Davari & Belilovsky 2024; mergekit's ``breadcrumbs``): in each task vector drop the largest
  ``gamma`` share of entries by magnitude (outliers) and keep the next ``density`` share (the small rest is
  dropped too), then ``Σ w_i (m_i ⊙ τ_i)``.
* **DELLA** (Deep et al. 2024, "drop, elect, fuse"): MagPrune drops each entry of a row with a probability that
  falls linearly with its magnitude rank (keep probabilities from ``density − ε/2`` for the smallest to
  ``density + ε/2`` for the largest, mean ``density``) and rescales a kept entry by ``1 / p_keep`` (unbiased:
  ``E[kept] = τ``); then TIES's sign election on ``Σ w_i τ'_i`` and the mean of the agreeing entries.
* **KnOTS-TIES** (Stoica et al. 2025, KnOTS): align first, then merge: the task vectors side by side
  ``[τ_1 … τ_n] = U S [V_1ᵀ … V_nᵀ]`` (one SVD, so ``τ_i = U S V_iᵀ`` in a shared basis), TIES on the aligned
  parts ``w_i V_iᵀ`` (each trimmed to its top ``density`` share by magnitude, signs elected, agreeing entries
  averaged), and ``U S V_mᵀ`` back.
* **Model Stock** (Jang et al. 2024): ``t · (Σ w_i τ_i) / Σ w_i`` with ``t = k cos θ / (1 + (k − 1) cos θ)``,
  ``cos θ`` the mean pairwise cosine of the ``k`` task vectors (per module): near-orthogonal updates are
  pulled towards the base (``t → 0``), aligned ones kept (``t → 1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GAMMA = 0.01  # Breadcrumbs: the share of largest-magnitude entries dropped (the paper's and mergekit's default)
EPSILON = 0.1  # DELLA: the spread of keep probabilities around density
METHODS = ("breadcrumbs", "della", "knots_ties", "model_stock")


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float = GAMMA) -> Tensor:
    """The kept entries (bool, ``tau``'s shape): not in the top ``gamma`` share by magnitude, and in the next
    ``density`` share."""
    if not 0.0 < density <= 1.0 or not 0.0 <= gamma < 1.0 or gamma + density > 1.0:
        raise ValueError(f"breadcrumbs: density={density}, gamma={gamma}: need 0 < density, 0 <= gamma, sum <= 1")
    n = tau.numel()
    order = tau.abs().flatten().argsort(descending=True)  # largest first
    top, keep = round(gamma * n), round(density * n)
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[top : top + keep]] = True
    return mask.view_as(tau)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float = EPSILON) -> Tensor:
    """Per entry, the probability of keeping it: linear in its magnitude rank within its row (module docstring)."""
    if not 0.0 < density <= 1.0 or epsilon < 0 or density - epsilon / 2 <= 0 or density + epsilon / 2 > 1:
        raise ValueError(
            f"della: density={density}, epsilon={epsilon}: need keep probabilities density ± epsilon/2 in (0, 1]"
        )
    rows = tau.reshape(-1, tau.shape[-1]) if tau.dim() > 1 else tau.reshape(1, -1)
    n = rows.shape[-1]
    ranks = rows.abs().argsort(-1).argsort(-1).to(torch.float64)  # 0 = the smallest magnitude of its row
    spread = ranks / (n - 1) - 0.5 if n > 1 else torch.zeros_like(ranks)
    return (density + epsilon * spread).to(tau.dtype).view_as(tau)


def della_drop(tau: Tensor, density: float, generator: torch.Generator, epsilon: float = EPSILON) -> Tensor:
    """MagPrune: each entry kept with its :func:`della_keep_probabilities` and rescaled by ``1 / p_keep``."""
    p = della_keep_probabilities(tau, density, epsilon)
    kept = torch.rand(tau.shape, generator=generator, dtype=torch.float64).to(tau.device) < p
    return torch.where(kept, tau / p, torch.zeros_like(tau))


def elect_and_fuse(taus: Sequence[Tensor]) -> Tensor:
    """TIES's sign election and disjoint mean: the sign of ``Σ τ_i`` per entry, then the mean of the entries that
    agree with it (0 where none does)."""
    stacked = torch.stack(list(taus))
    sign = stacked.sum(0).sign()
    agree = (stacked.sign() == sign) & (stacked != 0)
    count = agree.sum(0)
    return torch.where(count > 0, (stacked * agree).sum(0) / count.clamp_min(1), torch.zeros_like(sign))


def ties_trim(tau: Tensor, density: float) -> Tensor:
    """``tau`` with only its top ``density`` share of entries by magnitude kept (TIES's trim)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties trim: density={density} must be in (0, 1]")
    keep = max(1, round(density * tau.numel()))
    cut = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
    return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))


def knots_ties(taus: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """KnOTS alignment (one SVD of the task vectors side by side), then TIES on the aligned parts (module docstring)."""
    u, s, vh = torch.linalg.svd(torch.cat(list(taus), dim=1), full_matrices=False)
    k = int((s > s.max() * 1e-10).sum()) if s.numel() else 0
    parts = vh[:k].split(taus[0].shape[1], dim=1)  # V_i^T, (k, in) each: tau_i = U S V_i^T
    fused = elect_and_fuse([w * ties_trim(v, density) for w, v in zip(weights, parts, strict=True)])
    return (u[:, :k] * s[:k]) @ fused


def model_stock_ratio(taus: Sequence[Tensor]) -> float:
    """``t = k cos θ / (1 + (k − 1) cos θ)`` from the mean pairwise cosine of ``k >= 2`` task vectors (clamped to
    [0, 1]: opposed updates give ``t = 0``, the base)."""
    k = len(taus)
    if k < 2:
        raise ValueError("model_stock needs at least two task vectors (the angle between them sets the ratio)")
    flat = [t.flatten().double() for t in taus]
    cos = [
        torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0).item() for i in range(k) for j in range(i + 1, k)
    ]
    c = max(0.0, sum(cos) / len(cos))
    return k * c / (1 + (k - 1) * c)


def merge(
    taus: Sequence[Tensor],
    weights: Sequence[float],
    method: str,
    density: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One module's merged update by ``method`` (:data:`METHODS`) from its task vectors and signed weights."""
    if method not in METHODS:
        raise ValueError(f"task-vector merge {method!r}: expected one of {METHODS}")
    if len(taus) != len(weights) or not taus:
        raise ValueError(f"task-vector merge: {len(taus)} task vectors, {len(weights)} weights")
    if method == "model_stock":
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"model_stock: the weights {list(weights)} must have a positive sum (a weighted mean)")
        mean = torch.stack([w * t for w, t in zip(weights, taus, strict=True)]).sum(0) / total
        return model_stock_ratio(taus) * mean
    if density is None:
        raise ValueError(f"merge method {method!r} needs `density` in (0, 1]")
    if method == "knots_ties":
        return knots_ties(taus, weights, density)
    if method == "breadcrumbs":
        return torch.stack([w * t * breadcrumbs_mask(t, density) for w, t in zip(weights, taus, strict=True)]).sum(0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return elect_and_fuse([w * della_drop(t, density, gen) for w, t in zip(weights, taus, strict=True)])
