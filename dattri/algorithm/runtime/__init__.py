"""Runtime support shared by every phase: loaders and batches, devices, torch.distributed.

* :mod:`~dattri.algorithm.runtime.batching`: batch structure (tensor / tuple / dict),
  devices, progress bars, reusable buffers;
* :mod:`~dattri.algorithm.runtime.validation`: the input checks (device, loaders,
  first-batch checks) that turn raw errors into clear ones;
* :mod:`~dattri.algorithm.runtime.distributed`: rank/world, shards, all-reduce/gather;
* :mod:`~dattri.algorithm.runtime.loader_args`: the ``train=``/``test=`` keywords;
* :mod:`~dattri.algorithm.runtime.moved`: the pre-0.4 internal module paths.
"""
