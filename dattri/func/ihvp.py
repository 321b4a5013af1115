"""Alias module: ``from dattri.func.ihvp import ihvp_cg`` etc.

Everything is implemented once, in :mod:`dattri.func.hessian`; this module re-exports
its public names so both import paths give the same objects.
"""

from dattri.func.hessian import (
    CGInfo,
    IHVPUsageError,
    arnoldi_eigs,
    cg_solve,
    hvp,
    hvp_at_x,
    hvp_matvec,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
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
