"""Phase 3, *precondition*: the operator applied to one side of the inner product.

The damped inverses themselves are operators of :mod:`dattri.func`
(:class:`~dattri.func.linalg.DampedSymmetricInverse`, the iHVP solvers,
:mod:`dattri.func.fisher`); this package holds what the attributors need around them:

* :mod:`~dattri.algorithm.solve.mean_hvp`: the influence-function base, whose
  Hessian-vector product of the mean training loss runs over the cached batches (split
  over torch.distributed ranks and all-reduced);
* :mod:`~dattri.algorithm.solve.preconditioners`: the ``preconditioner=`` of
  ``IFAttributorCG``;
* :mod:`~dattri.algorithm.solve.ihvp_solvers`: upstream's ``SUPPORTED_IHVP_SOLVER``.
"""
