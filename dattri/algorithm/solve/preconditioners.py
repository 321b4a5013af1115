"""Preconditioners of the influence-function solvers, built from the cached data.

``build_preconditioner(attributor, kind, ckpt_idx, damping)`` returns ``P(m)`` on the
attributor's flat parameter layout (``task.selected_param_names(layer_name)``):

* ``"diagonal"``: ``1 / (diag(F) + damping)`` with the empirical-Fisher diagonal
  ``F_jj = mean_i g_ij^2`` of the per-sample training-loss gradients;
* ``"kfac"``: K-FAC per ``nn.Linear`` module (``Lambda = s a^T`` from the factor
  eigenvalues);
* ``"ekfac"``: EK-FAC per ``nn.Linear`` module (eigenvalue-corrected);
* ``"spectral"``: the top eigenspace of ``H + lambda I`` itself (block Krylov of
  ``rank`` batched HVPs of the solver's own operator, built once per checkpoint;
  :mod:`dattri.func.spectral_precond`). The only kind that cuts CG's products on the
  benchmark MLPs: their damped Hessian is a few outliers on a cluster at ``lambda``, which
  the Fisher-based kinds spread instead of keeping (see ``benchmarks/bench_pcg.py``);
* ``"kfac-spectral"`` / ``"ekfac-spectral"`` / ``"gkfac-spectral"``: split
  preconditioning ``P = C P_B C`` with ``C = (F + damping I)^{-1/2}`` the square root of
  the K-FAC (empirical Fisher), EK-FAC (empirical Fisher) or K-FAC of the true Fisher
  (labels sampled from the model's softmax: the Gauss-Newton matrix of a cross-entropy
  classifier) and ``P_B`` the spectral deflation of ``B = C (H + lambda I) C`` from
  ``rank`` products (:func:`dattri.func.spectral_precond.split_spectral_preconditioner`):
  the deflation fixes the directions where the Kronecker curvature is wrong (both ends
  of ``B``'s spectrum). SPD; the solve is still the exact ``(H + lambda I)^{-1} v``.
  On the benchmark MLPs not better than ``"spectral"`` (``benchmarks/bench_pcg.py``);
* a callable: used as is.

``"spectral"`` options: ``keep`` (keep only that many of the ``rank`` Ritz pairs, those
of largest ``|eig(H)|``, the best converged) and ``subsample`` (build the Krylov space
from the Hessian of a seeded random ``subsample`` fraction of the cached batches, each
product costing that fraction of a full one: sub-sampled Newton / PROMISE, Frangella,
Rathore, Zhao & Udell 2023). The solve stays the exact ``(H + lambda I)^{-1} v`` of the
full data (``P`` is SPD whatever it was built from). Measured on the benchmark MLP of
~100k parameters (``benchmarks/results/bench_pcg.md``): the Hessian of 10 % of the data
has its leading eigenvalues (after the first ten) 1.7-2.5x those of the full one and
its band in other directions, so its deflation cuts CG's products less than a full-data
one of the same cost; there, a full-data basis of ``rank=1536`` with ``keep=1024``
(the ~1000 eigenvalues of ``H`` above ``lambda``) cuts them 6x, a build that pays for
itself over thousands of test vectors.

Parameters outside every ``nn.Linear`` module (K-FAC/EK-FAC) are divided by the mean
block eigenvalue plus damping. Default damping: the solver's ``regularization`` when
positive, else ``1e-3`` times the mean diagonal/eigenvalue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dattri.algorithm.solve.mean_hvp import MeanLossHVP
from dattri.func.fisher import ekfac_eigenvalues, kfac_factors
from dattri.func.preconditioners import (
    KroneckerBlock,
    diagonal_preconditioner,
    kfac_block,
    kronecker_preconditioner,
)
from dattri.func.spectral_precond import spectral_preconditioner, split_spectral_preconditioner

if TYPE_CHECKING:
    from dattri.algorithm.solve.mean_hvp import IFBase

__all__ = ["PRECONDITIONERS", "build_preconditioner", "subsample_batches"]

PRECONDITIONERS = (
    "diagonal",
    "kfac",
    "ekfac",
    "spectral",
    "kfac-spectral",
    "ekfac-spectral",
    "gkfac-spectral",
)


def check_preconditioner(kind: str | Callable | None) -> str | Callable | None:
    """Validate a ``preconditioner`` argument (None, a name or a callable)."""
    if kind is None or callable(kind) or kind in PRECONDITIONERS:
        return kind
    msg = f"preconditioner must be None, one of {PRECONDITIONERS} or a callable; got {kind!r}."
    raise ValueError(msg)


def check_subsample(subsample: float | None, kind: str | Callable | None) -> float | None:
    """Validate ``preconditioner_subsample`` (None or a fraction in ``(0, 1]``, spectral)."""
    if subsample is None:
        return None
    if (
        isinstance(subsample, bool)
        or not isinstance(subsample, (int, float))
        or not 0 < subsample <= 1
    ):
        msg = (
            "preconditioner_subsample must be None or the fraction of training batches "
            f"in (0, 1] that builds the spectral preconditioner, got {subsample!r}."
        )
        raise ValueError(msg)
    if kind != "spectral":
        msg = (
            "preconditioner_subsample is used by preconditioner='spectral' only; got "
            f"preconditioner={kind!r}. Drop preconditioner_subsample or use 'spectral'."
        )
        raise ValueError(msg)
    return float(subsample)


def subsample_batches(n_batches: int, fraction: float, seed: int = 0) -> list[int]:
    """Indices (sorted) of ``max(1, round(fraction * n_batches))`` batches, seeded.

    Args:
        n_batches: Number of cached batches.
        fraction: Fraction of them to draw, in ``(0, 1]``.
        seed: Seed of the draw (a local generator: the global RNG is untouched).

    Returns:
        Distinct batch indices in increasing order; the same for the same arguments.
    """
    count = min(n_batches, max(1, round(fraction * n_batches)))
    perm = torch.randperm(n_batches, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:count].tolist())


def _subsample_operator(
    att: IFBase, ckpt_idx: int, fraction: float, regularization: float, seed: int
) -> tuple[MeanLossHVP, float]:
    """``H_S + regularization * I`` on a seeded fraction of the cached batches.

    Returns:
        The operator and its cost per product relative to the full-data operator (the
        sampled fraction of the cached samples).

    Raises:
        NotImplementedError: with training data sharded over torch.distributed ranks.
    """
    if att._n_total is not None:
        msg = (
            "preconditioner_subsample is not implemented with training data sharded over "
            "torch.distributed ranks (each rank would need the same draw of batches)."
        )
        raise NotImplementedError(msg)
    func, params = att._loss_and_params(ckpt_idx)
    idx = subsample_batches(len(att._batches), fraction, seed)
    chosen = [(att._batches[i], att._sizes[i]) for i in idx]
    n_sub = sum(size for _, size in chosen)
    op = MeanLossHVP(
        func,
        params,
        chosen,
        n_sub,
        getattr(att, "mode", "rev-rev"),
        regularization,
        load=lambda: att.task.load_checkpoint(ckpt_idx),
    )
    return op, n_sub / att.n_cached


def _default_damping(damping: float | None, regularization: float, scale: float) -> float:
    if damping is not None:
        return float(damping)
    return float(regularization) if regularization > 0 else 1e-3 * max(scale, 1e-30)


def build_preconditioner(
    att: IFBase,
    kind: str | Callable,
    ckpt_idx: int,
    damping: float | None,
    regularization: float,
    *,
    operator: Callable[[Tensor], Tensor] | None = None,
    rank: int = 192,
    keep: int | None = None,
    subsample: float | None = None,
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """``P(m)`` for ``kind`` on ``att``'s cached batches at checkpoint ``ckpt_idx``.

    ``operator`` (the solver's ``H + regularization * I``) and ``rank`` are used by
    the ``"*spectral"`` kinds (``"spectral"`` ignores ``damping``: it inverts the operator
    itself); ``keep``, ``subsample`` and ``seed`` (of the batch draw and the Krylov start)
    by ``"spectral"`` only (see the module docstring).
    """
    if callable(kind):
        return kind
    if kind in ("kfac-spectral", "ekfac-spectral", "gkfac-spectral"):
        if operator is None:
            msg = f"build_preconditioner: {kind!r} needs the solver's `operator`."
            raise ValueError(msg)
        bulk = kind.split("-")[0]
        batches = None
        if bulk == "gkfac":  # K-FAC of the true Fisher (= GGN of the cross-entropy)
            bulk, batches = "kfac", _sampled_label_batches(att, ckpt_idx)
        half = _kronecker(att, bulk, ckpt_idx, damping, regularization, power=0.5, batches=batches)
        _func, params = att._loss_and_params(ckpt_idx)
        return split_spectral_preconditioner(
            operator,
            half,
            params.numel(),
            rank,
            dtype=params.dtype,
            device=params.device,
            verbose=att.verbose,
        )
    if kind == "spectral":
        if operator is None:
            msg = "build_preconditioner: 'spectral' needs the solver's `operator`."
            raise ValueError(msg)
        _func, params = att._loss_and_params(ckpt_idx)
        cost = 1.0
        if subsample is not None and subsample < 1:
            operator, cost = _subsample_operator(att, ckpt_idx, subsample, regularization, seed)
        return spectral_preconditioner(
            operator,
            params.numel(),
            regularization,
            rank,
            dtype=params.dtype,
            device=params.device,
            seed=seed,
            verbose=att.verbose,
            keep=keep,
            product_cost=cost,
        )
    if kind == "diagonal":
        total = None
        for batch in att._batches:
            g = att.task.per_sample_grads(batch, ckpt_idx, att.layer_name, keep_batch_dim=True)
            sq = (g * g).sum(0)
            total = sq if total is None else total + sq
        diag = total / att.n_cached
        return diagonal_preconditioner(
            diag, _default_damping(damping, regularization, float(diag.mean()))
        )
    return _kronecker(att, kind, ckpt_idx, damping, regularization)


def _kronecker(
    att: IFBase,
    kind: str,
    ckpt_idx: int,
    damping: float | None,
    regularization: float,
    *,
    power: float = 1.0,
    batches: list | None = None,
) -> Callable[[Tensor], Tensor]:
    from dattri.algorithm.if_ekfac import IFAttributorEKFAC

    batches = att._batches if batches is None else batches
    names = att.task.selected_param_names(att.layer_name)
    offsets, pos = {}, 0
    for n in names:
        offsets[n] = pos
        pos += att.task.named_parameters[n].numel()
    helper = IFAttributorEKFAC(att.task, device=att.device, damping=1.0, verbose=att.verbose)

    def pname(module: str, attr: str) -> str:
        return f"{module}.{attr}" if module else attr

    modules = [
        m
        for m in helper.module_name
        if pname(m, "weight") in offsets and (not helper._bias[m] or pname(m, "bias") in offsets)
    ]
    cov = {m: [0.0, 0.0] for m in modules}
    count = 0
    for size, factors in helper._factor_batches(ckpt_idx, batches, "K-FAC factors"):
        for m in modules:
            a, ds = factors[m]
            cov_a, cov_s = kfac_factors(a, ds)
            cov[m][0] = cov[m][0] + size * cov_a
            cov[m][1] = cov[m][1] + size * cov_s
        count += size
    blocks: list[KroneckerBlock] = []
    for m in modules:
        bias = offsets[pname(m, "bias")] if helper._bias[m] else None
        blocks.append(
            kfac_block(cov[m][0] / count, cov[m][1] / count, offsets[pname(m, "weight")], bias)
        )
    if kind == "ekfac":
        lam = {m: 0.0 for m in modules}
        for size, factors in helper._factor_batches(ckpt_idx, batches, "EK-FAC eigenvalues"):
            for blk, m in zip(blocks, modules, strict=True):
                a, ds = factors[m]
                lam[m] = lam[m] + size * ekfac_eigenvalues(a, ds, blk.q_a, blk.q_s)
        for blk, m in zip(blocks, modules, strict=True):
            blk.lam = lam[m] / count
    scale = float(torch.cat([b.lam.reshape(-1) for b in blocks]).mean()) if blocks else 1.0
    damp = _default_damping(damping, regularization, scale)
    if power != 1.0:  # (Lambda + damping)^-power: Lambda' = (Lambda + damping)^power, no damping
        for blk in blocks:
            blk.lam = (blk.lam + damp) ** power
        return kronecker_preconditioner(blocks, pos, 0.0, fallback=(scale + damp) ** power)
    return kronecker_preconditioner(blocks, pos, damp, fallback=scale)


def _sampled_label_batches(att: IFBase, ckpt_idx: int, seed: int = 0) -> list:
    """Cached ``(x, y)`` batches with ``y`` drawn from the model's ``softmax(model(x))``.

    Per-sample gradients of the cross-entropy at sampled labels have the true Fisher
    (= the Gauss-Newton matrix of the cross-entropy) as covariance, where the observed
    labels give the empirical Fisher (which a well-fit model makes ~0).

    Raises:
        ValueError: if a batch is not ``(inputs, integer labels (B,))`` with the model
            returning ``(B, classes)`` logits.
    """
    from torch.func import functional_call

    model = att.task.get_model()
    params = att.task.get_param_dict(ckpt_idx)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, batch in enumerate(att._batches):
        ok = isinstance(batch, (tuple, list)) and len(batch) == 2
        if ok:
            x, y = batch
            with torch.no_grad():
                logits = functional_call(model, params, (x,))
            ok = (
                isinstance(y, Tensor)
                and not y.is_floating_point()
                and y.ndim == 1
                and logits.ndim == 2
                and logits.shape[0] == y.shape[0]
            )
        if not ok:
            msg = (
                f"preconditioner 'gkfac-spectral': batch {i} is not (inputs, integer labels "
                "(B,)) with (B, classes) logits from the model; it samples labels from the "
                "model's softmax (cross-entropy classifiers). Use 'kfac-spectral' instead."
            )
            raise ValueError(msg)
        probs = torch.softmax(logits.detach().double().cpu(), dim=1)
        y_hat = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(y)
        out.append((x, y_hat))
    return out
