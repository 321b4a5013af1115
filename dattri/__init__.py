"""dattri: data attribution for PyTorch.

Subpackages:
    dattri.task: ``AttributionTask`` (model, loss/target functions, checkpoints).
    dattri.func: pure functional pieces (per-sample gradients, HVP/IHVP, Fisher, projection).
    dattri.algorithm: attributors sharing one base class.
    dattri.metric: LDS, LOO correlation, mislabel AUC, brittleness, ground truth.
    dattri.model_util: retraining, dropout ensembles, hooks.
    dattri.benchmark: datasets, models, settings and the ``dattri-bench`` command.
"""

__version__ = "0.4.0.dev0"
