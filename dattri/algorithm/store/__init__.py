"""Phase 2, *store*: keep the training rows of phase 1.

* :mod:`~dattri.algorithm.store.in_memory`: per-checkpoint ``(n, d)`` tensors;
* :mod:`~dattri.algorithm.store.memmap_store`: the on-disk, resumable, checksummed
  memmap + manifest store (``cache_dir``), shared by torch.distributed ranks;
* :mod:`~dattri.algorithm.store.scaled`: picks one of them from ``ScaleOptions``
  (``cache_dir``, ``store_dtype``, ``max_memory``) and shards the work over ranks;
* :mod:`~dattri.algorithm.store.host_rows`: rows in host memory (LoGra's ``offload="cpu"``);
* :mod:`~dattri.algorithm.store.integrity`: fingerprints and row checksums.
"""
