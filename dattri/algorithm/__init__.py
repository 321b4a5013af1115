"""Attributors, all sharing the base API of :mod:`dattri.algorithm.base`.

``cache(train_loader)``, ``attribute(...)`` -> ``(n_train, n_test)`` (larger = the
training sample helps the test target), ``self_attribute(train_loader)`` -> ``(n_train,)``
and ``attribute_topk(...)``. Exceptions kept from upstream dattri 0.3:
``TRAKAttributor.attribute(test_loader, train_loader=None)``,
``KNNShapleyAttributor.attribute`` returns ``(n_test, n_train)`` (use
``attribute_train_test`` for ``(n_train, n_test)``) and
``DVEmbAttributor.attribute(test_loader, epoch=None, train_data_indices=None)``.
Whatever the positional order, every attributor also takes its loaders by role:
``attribute(train=..., test=...)``, ``attribute_topk(train=..., test=..., k=...)``,
``self_attribute(train=...)`` (DVEmb's ``attribute`` takes ``test=`` only).
"""

from dattri.algorithm.base import BaseAttributor, BaseInnerProductAttributor
from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.data_shapley import KNNShapleyAttributor
from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.algorithm.factgrass import FactGraSSAttributor
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.magic import MAGICAttributor
from dattri.algorithm.per_token import PerTokenTopK, attribute_per_token
from dattri.algorithm.rps import RPSAttributor
from dattri.algorithm.runtime.moved import install_aliases
from dattri.algorithm.score.topk import TopKResult
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor

install_aliases()

__all__ = [
    "BaseAttributor",
    "BaseInnerProductAttributor",
    "BlockProjectedIFAttributor",
    "DVEmbAttributor",
    "FactGraSSAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorDataInf",
    "IFAttributorEKFAC",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
    "KNNShapleyAttributor",
    "LoGraAttributor",
    "MAGICAttributor",
    "PerTokenTopK",
    "RPSAttributor",
    "TRAKAttributor",
    "TopKResult",
    "TracInAttributor",
    "attribute_per_token",
]
