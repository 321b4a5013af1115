"""Phase 1, *featurize*: one batch -> per-sample feature rows ``(B, d)``.

* :mod:`~dattri.algorithm.features.gradients`: per-sample gradients of every checkpoint,
  randomly projected or exact (TracIn, TRAK, the influence functions);
* :mod:`~dattri.algorithm.features.block_compress`: LoGra/FactGraSS layer-wise factored
  projections of the per-sample gradients (``BlockFeaturizer``, the same interface as
  ``GradientFeaturizer``, so both feed the same stores).
"""
