"""Arnoldi projector: project onto the top eigenvectors of a Hessian.

``ArnoldiProjector`` runs a small Arnoldi iteration (Schioppa et al., 2022,
"Scaling Up Influence Functions") on Hessian-vector products of ``func`` at
``x`` computed with :mod:`torch.func`, keeps the top eigenpairs and maps
features ``g`` to ``g Uᵀ / sqrt(λ)``, so that inner products of projected
features approximate ``g₁ᵀ H⁻¹ g₂`` restricted to the kept eigenspace.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from dattri.func.hessian_arnoldi import arnoldi_eigs
from dattri.func.hvp_core import _regularized_matvec
from dattri.func.projection_engine import AbstractProjector, check_positive_int

_MODES = ("rev-rev", "rev-fwd")


class ArnoldiProjector(AbstractProjector):
    """Projector onto the top Hessian eigenspace found by Arnoldi iteration."""

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        func: Callable[..., Tensor],
        x: Tensor | tuple[Tensor, ...],
        argnums: int = 0,
        max_iter: int = 100,
        norm_constant: float = 1.0,
        tol: float = 1e-7,
        mode: str = "rev-fwd",
        regularization: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        *,
        verbose: bool = True,
    ) -> None:
        """Store the settings; the eigenspace is computed lazily.

        Args:
            feature_dim: Number of elements of ``x[argnums]`` (the Hessian is
                ``(feature_dim, feature_dim)``).
            proj_dim: Number of eigenpairs to keep (may shrink, see
                :meth:`get_eigenspace`).
            func: Scalar function called as ``func(*x)`` (``x`` wrapped into a
                1-tuple when it is a single tensor).
            x: Point at which the Hessian is taken.
            argnums: Index of the differentiated argument in ``x``.
            max_iter: Maximum Krylov dimension (number of HVPs).
            norm_constant: The iteration runs on ``H / norm_constant`` for
                numerical scaling; eigenvalues are reported for ``H``.
            tol: Stop when the new Krylov residual norm falls below ``tol``;
                eigenvalues ``<= tol**2`` are dropped.
            mode: ``"rev-rev"`` (vjp of grad, linearised once) or ``"rev-fwd"``
                (jvp of grad).
            regularization: ``λ`` added to the diagonal: ``H + λ I``.
            seed: Seed of the local generator for the start vector (the global
                torch seed is never touched).
            device: Device of the eigenvectors and of the projected output.
            verbose: Show a tqdm bar over Arnoldi steps.

        Raises:
            TypeError: If ``func`` is not callable.
            ValueError: For invalid values (mode, sizes, tolerances).
        """
        super().__init__(feature_dim, proj_dim, seed, None, device)
        if not callable(func):
            msg = "func must be callable: func(*x) -> scalar tensor."
            raise TypeError(msg)
        args = x if isinstance(x, tuple) else (x,)
        if not -len(args) <= argnums < len(args):
            msg = f"argnums={argnums} is out of range for {len(args)} argument(s)."
            raise ValueError(msg)
        target = args[argnums]
        if not isinstance(target, Tensor) or not target.dtype.is_floating_point:
            msg = "x[argnums] must be a floating-point tensor."
            raise TypeError(msg)
        if target.numel() != self.feature_dim:
            msg = f"feature_dim={self.feature_dim} but x[argnums] has {target.numel()} elements."
            raise ValueError(msg)
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}."
            raise ValueError(msg)
        if not norm_constant > 0 or not math.isfinite(norm_constant):
            msg = f"norm_constant must be a positive finite float, got {norm_constant}."
            raise ValueError(msg)
        if not tol >= 0:
            msg = f"tol must be >= 0, got {tol}."
            raise ValueError(msg)
        self.func = func
        self.args = args
        self.argnums = argnums % len(args)
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.norm_constant = float(norm_constant)
        self.tol = float(tol)
        self.mode = mode
        self.regularization = float(regularization)
        self.verbose = verbose
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None

    def get_eigenspace(self) -> tuple[Tensor, Tensor]:
        """Run Arnoldi and keep the top eigenpairs.

        The ``proj_dim`` eigenpairs of largest ``|λ|`` are kept; those with
        ``λ <= tol**2`` are then dropped (``1/sqrt(λ)`` needs ``λ > 0``) and
        ``proj_dim`` shrinks accordingly, with a warning (upstream behaviour: a
        Hessian of rank ``r < proj_dim``, e.g. ``feature_dim < proj_dim``, has
        only ``r`` usable directions). If *no* eigenvalue is left, a
        ``ValueError`` is raised instead of returning an empty projection.

        Returns:
            ``(eigenvalues, eigenvectors)`` of shapes ``(proj_dim,)`` and
            ``(proj_dim, feature_dim)``, in decreasing ``|λ|`` order.

        Raises:
            ValueError: If none of the top ``proj_dim`` eigenvalues is
                ``> tol**2`` (the projection would have zero columns).
        """
        target = self.args[self.argnums]
        op = _regularized_matvec(self.func, self.args, self.argnums, self.mode, self.regularization)
        steps = min(self.max_iter, self.feature_dim)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        with torch.no_grad():
            values, vectors = arnoldi_eigs(
                lambda rows: op(rows).detach() / self.norm_constant,
                gen,
                target.detach().reshape(-1),
                steps,
                self.tol,
                self.verbose,
            )
        values = values * self.norm_constant
        order = torch.argsort(values.abs(), descending=True)[: self.proj_dim]
        keep = order[values[order] > self.tol**2]
        if keep.numel() == 0:
            top = values[order[:3]].tolist()
            msg = (
                f"ArnoldiProjector: none of the top {order.numel()} Hessian eigenvalues "
                f"(largest |λ|: {[f'{v:.3g}' for v in top]}) is > tol**2={self.tol**2:g}, "
                "so the projection would be empty (0 columns). The Hessian of `func` at "
                "`x` is not positive in its dominant directions (linear, concave or "
                "numerically zero loss). Pass `regularization` > 0, a smaller `tol`, or "
                "check `func`/`x`."
            )
            raise ValueError(msg)
        if keep.numel() < self.proj_dim:
            warnings.warn(
                f"ArnoldiProjector: only {keep.numel()} of proj_dim={self.proj_dim} "
                f"eigenvalues are > tol**2={self.tol**2:g} (Krylov size {steps}); "
                f"proj_dim is reduced to {keep.numel()}.",
                UserWarning,
                stacklevel=2,
            )
            self.proj_dim = int(keep.numel())
        self.eigenvalues = values[keep].to(device=self.device)
        self.eigenvectors = vectors[keep].to(self.device)
        return self.eigenvalues, self.eigenvectors

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        """Project ``features`` to ``features Uᵀ / sqrt(λ)``.

        Args:
            features: ``(B, feature_dim)`` tensor.
            ensemble_id: Ignored (the projection is deterministic); kept for
                interface compatibility.

        Returns:
            ``(B, proj_dim)`` tensor in the dtype of ``features``.

        Raises:
            ValueError: If ``features`` has the wrong shape.
        """
        del ensemble_id
        if not isinstance(features, Tensor) or features.dim() != 2:
            msg = "features must be a (batch_size, feature_dim) tensor."
            raise ValueError(msg)
        if features.shape[1] != self.feature_dim:
            msg = (
                f"features have {features.shape[1]} columns, expected "
                f"feature_dim={self.feature_dim}."
            )
            raise ValueError(msg)
        if self.eigenvectors is None:
            self.get_eigenspace()
        vecs = self.eigenvectors
        scaled = vecs / self.eigenvalues.sqrt().unsqueeze(1)
        feats = features.to(device=self.device, dtype=vecs.dtype)
        return (feats @ scaled.T).to(features.dtype)

    def free_memory(self) -> None:
        """Drop the cached eigenspace (recomputed on the next ``project``)."""
        self.eigenvalues = None
        self.eigenvectors = None


def arnoldi_project(
    feature_dim: int,
    func: Callable[..., Tensor],
    x: Tensor | tuple[Tensor, ...],
    argnums: int = 0,
    proj_dim: int = 100,
    max_iter: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Callable[[Tensor], Tensor]:
    """Build an :class:`ArnoldiProjector` and return its projection function.

    Args:
        feature_dim: Number of elements of ``x[argnums]``.
        func: Scalar function called as ``func(*x)``.
        x: Point at which the Hessian is taken.
        argnums: Index of the differentiated argument.
        proj_dim: Number of eigenpairs kept.
        max_iter: Maximum Krylov dimension.
        norm_constant: Scaling of the Hessian during the iteration.
        tol: Residual tolerance (see :class:`ArnoldiProjector`).
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: Diagonal shift ``λ``.
        seed: Seed of the start vector.
        device: Output device.

    Returns:
        ``f(features)`` mapping ``(B, feature_dim)`` to ``(B, proj_dim)``; the
        eigenspace is computed on the first call.
    """
    projector = ArnoldiProjector(
        feature_dim,
        proj_dim,
        func,
        x,
        argnums=argnums,
        max_iter=max_iter,
        norm_constant=norm_constant,
        tol=tol,
        mode=mode,
        regularization=regularization,
        seed=seed,
        device=device,
        verbose=False,
    )

    def _project(features: Tensor) -> Tensor:
        return projector.project(features)

    return _project
