"""Hessian-vector products (HVP) and inverse-Hessian-vector products (IHVP).

Conventions shared by every function here:

- ``func(*x)`` returns a scalar tensor; ``x`` is a tuple of tensors (a bare tensor is
  treated as a 1-tuple). Derivatives are taken w.r.t. ``x[argnums]`` (any shape; ``p`` =
  its number of elements, usually a flat parameter vector of shape ``(p,)``).
- ``v`` is one vector, shaped like ``x[argnums]`` or flat ``(p,)``, or a batch of ``k``
  vectors stacked on a new leading dim: ``(k, *x[argnums].shape)`` or ``(k, p)``. Every
  function is vectorised over the rows of a batch (no Python loop over vectors) and
  returns a tensor of ``v``'s shape, dtype and device (work happens on ``x[argnums]``'s
  device and dtype).
- ``H`` is the Hessian of ``func`` w.r.t. ``x[argnums]``; ``regularization`` adds
  ``regularization * I``.
- Bad input raises :class:`IHVPUsageError` (a ``ValueError``).

The public names are re-exported by :mod:`dattri.func.ihvp`.
"""

from dattri.func.hessian_arnoldi import arnoldi_eigs, ihvp_arnoldi, ihvp_at_x_arnoldi
from dattri.func.hessian_lissa import ihvp_at_x_lissa, ihvp_lissa
from dattri.func.hvp_core import (
    CGInfo,
    IHVPUsageError,
    cg_solve,
    hvp,
    hvp_at_x,
    hvp_matvec,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_cg,
    ihvp_explicit,
    linearization_bytes,
    neumann_solve,
)

__all__ = [
    "CGInfo",
    "IHVPUsageError",
    "arnoldi_eigs",
    "cg_solve",
    "hvp",
    "hvp_at_x",
    "hvp_matvec",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
    "linearization_bytes",
    "neumann_solve",
]
