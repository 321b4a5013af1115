"""Upstream's ``dattri.model_util.ensemble`` module (empty in upstream dattri 0.3).

Kept so that ``import dattri.model_util.ensemble`` keeps working. Ensembling over
models is done by passing several checkpoints to :class:`dattri.task.AttributionTask`
(each attributor combines them, see :mod:`dattri.algorithm`).
"""
