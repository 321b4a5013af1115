"""Alias module: ``from dattri.func.ihvp import ihvp_cg`` etc.

Everything is implemented once, in :mod:`dattri.func.hessian`; this module re-exports
its public names (its ``__all__``, the one list of them) so both import paths give the
same objects.
"""

from dattri.func.hessian import *  # noqa: F403
from dattri.func.hessian import __all__  # noqa: F401
