"""Phase 4, *score*: inner products in tiles, into a sink.

* :mod:`~dattri.algorithm.score.tiles`: tile sizes from ``max_memory``; tiles over a
  store or a loader; sinks (in-memory tensor, ``.npy`` score file, streaming top-k),
  each combining torch.distributed ranks;
* :mod:`~dattri.algorithm.score.topk`: the per-test top-k accumulator and its result.
"""
