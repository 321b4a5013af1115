"""Model utilities: retraining for ground truth, MC-dropout, layer hooks.

* :func:`retrain_loo`, :func:`retrain_lds`: generic retraining with any
  ``train_func`` (resumable, state_dicts, relative paths).
* :func:`train_subset_models`, :func:`retrain_lds_vectorized`,
  :class:`SubsetTrainConfig`: many small models trained at once with ``vmap``.
* :func:`activate_dropout`, :func:`get_final_layer_io`.
"""

from dattri.model_util.dropout import activate_dropout
from dattri.model_util.hook import get_final_layer_io
from dattri.model_util.retrain import retrain_lds, retrain_loo
from dattri.model_util.subset_train import (
    SubsetTrainConfig,
    retrain_lds_vectorized,
    train_subset_models,
)

__all__ = [
    "SubsetTrainConfig",
    "activate_dropout",
    "get_final_layer_io",
    "retrain_lds",
    "retrain_lds_vectorized",
    "retrain_loo",
    "train_subset_models",
]
