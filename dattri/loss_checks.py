"""Cheap checks of the user's loss/target functions, data and checkpoints.

Used by :class:`~dattri.task.AttributionTask` (and through it by every attributor) to
turn wrong inputs into one clear error or warning that names the argument, the
offending sample/batch and the fix, instead of a raw PyTorch error deep inside
``vmap`` or a silently wrong score matrix:

* :func:`check_loss_on_batch` runs the user's function ONCE on the first sample (and,
  for the mean-loss convention, on the first batch and on that batch duplicated) and
  checks the signature, the argument order, the returned shape, that the value depends
  on the ``params`` it is given, and that a mean loss is not a sum;
* :func:`explain_error` maps a raw error raised while evaluating the function on a
  batch (label out of range, wrong feature size, float labels, dtype mismatch) to a
  ``ValueError`` naming the sample;
* :func:`check_train_mode` warns when a model is left in train mode with active
  dropout/batch-norm after loading a checkpoint.

Only ``torch`` and :mod:`dattri.func` are imported (the task layer).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SIGNATURES",
    "check_loss_on_batch",
    "check_train_mode",
    "explain_error",
    "explained_errors",
    "tensors_of",
    "train_mode_ok",
]

#: the calling convention of each attributor family (stated in error messages).
SIGNATURES = {
    True: (
        "loss_func(params, data) -> scalar, with params a {name: tensor} dict for "
        "torch.func.functional_call and data one batch (x, y) whose tensors keep the "
        "batch dimension; the value is the MEAN loss of the batch (influence-function "
        "family: IF-CG/explicit/LiSSA/Arnoldi/DataInf/EK-FAC/LoGra)"
    ),
    False: (
        "loss_func(params, data) -> scalar, with params a {name: tensor} dict for "
        "torch.func.functional_call and data ONE un-batched sample (x, y) "
        "(TRAK/TracIn/Grad-Dot/Grad-Cos/DVEmb convention)"
    ),
}

#: relative tolerance of "the loss of the duplicated batch is twice the loss".
_SUM_RTOL = 1e-3


def tensors_of(data: Any) -> list[Tensor]:
    """The tensors of a batch (tensor, tuple/list or dict), in order."""
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, Mapping):
        data = list(data.values())
    if isinstance(data, (list, tuple)):
        out: list[Tensor] = []
        for v in data:
            out += tensors_of(v)
        return out
    return []


def _map(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return {k: _map(v, fn) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return (
            type(data)(_map(v, fn) for v in data)
            if isinstance(data, list)
            else tuple(_map(v, fn) for v in data)
        )
    return data


def _param_dtype(params: Mapping[str, Tensor]) -> torch.dtype | None:
    for p in params.values():
        if p.is_floating_point():
            return p.dtype
    return None


def _first_linear(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            return m
    return None


def _num_outputs(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def _label_rows(data: Any, bad: Callable[[Tensor], Tensor]) -> tuple[int, float] | None:
    """First ``(row, value)`` of an integer tensor of the batch where ``bad`` holds."""
    for t in tensors_of(data):
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() == 0:
            continue
        mask = bad(t).reshape(t.shape[0], -1).any(dim=1)
        if bool(mask.any()):
            row = int(mask.nonzero()[0, 0])
            vals = t[row].reshape(-1)
            return row, float(vals[bad(vals)][0])
    return None


def explain_error(
    err: BaseException,
    *,
    model: nn.Module,
    data: Any,
    where: str,
    func_name: str = "loss_func",
    first_row: int | None = None,
) -> ValueError | None:
    """A clear ``ValueError`` for a raw error raised while evaluating ``func_name``.

    Args:
        err: the raw exception.
        model: the model (for its number of classes and input size).
        data: the batch the function was evaluated on.
        where: what the batch is, e.g. ``"batch 1 of train_dataloader"``.
        func_name: the user's function that was being evaluated.
        first_row: global index of the batch's first sample, if known (to name the
            sample; else the row within the batch is named).

    Returns:
        The error to raise (``from err``), or None when the cause is not recognised.
    """
    text = str(err)
    low = text.lower()
    n_out = _num_outputs(model)
    if "out of bounds" in low:
        limit = n_out
        m = re.search(r"with size (\d+)", text)
        if m:
            limit = int(m.group(1))
        hit = None
        if limit is not None:
            hit = _label_rows(data, lambda t: (t < 0) | (t >= limit))
        if hit is None:
            m = re.search(r"(?:index|target) (-?\d+)", low)
            if m:
                value = int(m.group(1))
                hit = _label_rows(data, lambda t: t == value)
        if hit is not None:
            row, value = hit
            classes = f"{limit} classes (0..{limit - 1})" if limit else "fewer classes"
            who = f"row {row}" if first_row is None else f"sample {first_row + row} (row {row})"
            return ValueError(
                f"{where}: {who} of the batch has label "
                f"{value:g} but the model has {classes}. Fix the labels (they must be "
                "class indices in [0, num_classes)) or the model's output size."
            )
    if (
        "expected target dtype" in low
        or ("long" in low and "target" in low)
        or ("expected scalar type long" in low)
    ):
        floats = [t for t in tensors_of(data) if t.is_floating_point()]
        shape = tuple(floats[-1].shape) if floats else "?"
        return ValueError(
            f"{where}: the labels are floating point (tensor of shape {shape}) but "
            f"{func_name} needs integer class indices (cross_entropy/nll_loss). Pass "
            "labels as torch.long (y.long(), or build the dataset with dtype=torch.long)."
        )
    if (
        "must have the same dtype" in low
        or "expected scalar type" in low
        or ("dtype" in low and ("double" in low or "float" in low or "half" in low))
    ):
        dtypes = sorted({str(t.dtype) for t in tensors_of(data) if t.is_floating_point()})
        pdt = _param_dtype(dict(model.named_parameters()))
        return ValueError(
            f"{where}: {func_name} failed because the data ({', '.join(dtypes)}) and the "
            f"model ({pdt}) have different dtypes ({text.splitlines()[0]}). Cast the data "
            "to the model's dtype (e.g. x.float()) or the model to the data's."
        )
    if (
        "shapes cannot be multiplied" in low
        or "size mismatch" in low
        or "must match the size" in low
        or "expected input" in low
        or "number of columns" in low
        or "input channels" in low
    ):
        shapes = [tuple(t.shape) for t in tensors_of(data)]
        first = _first_linear(model)
        want = ""
        if isinstance(first, nn.Linear):
            want = f" The model's first layer expects {first.in_features} input features."
        elif first is not None:
            want = f" The model's first layer is {first}."
        return ValueError(
            f"{where}: the sample shapes {shapes} do not fit the model ({text.splitlines()[0]})."
            f"{want} Check that this loader holds data of the same kind and feature size as "
            "the training data."
        )
    return None


@contextmanager
def explained_errors(
    model: nn.Module,
    data: Any,
    where: str,
    func_name: str = "loss_func",
    first_row: int | None = None,
) -> Iterator[None]:
    """Re-raise a raw ``RuntimeError``/``IndexError`` of the block as a clear ``ValueError``.

    Errors :func:`explain_error` does not recognise propagate unchanged.

    Args:
        model: the model (sizes the messages).
        data: the batch being evaluated.
        where: the batch, e.g. ``"batch 3 of full_train_dataloader"``.
        func_name: the user's function evaluated in the block.
        first_row: global index of the batch's first sample, if known.

    Yields:
        None.
    """
    try:
        yield
    except (RuntimeError, IndexError) as err:
        clear = explain_error(
            err, model=model, data=data, where=where, func_name=func_name, first_row=first_row
        )
        if clear is None:
            raise
        raise clear from err


def _call_error(func: Callable, args: tuple) -> str | None:
    """Why ``func(*args)`` cannot bind (wrong number of arguments), or None."""
    try:
        inspect.signature(func).bind(*args)
    except TypeError as err:
        return str(err)
    except ValueError:
        return None
    return None


def check_loss_on_batch(
    func: Callable,
    func_name: str,
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Any,
    *,
    keep_batch_dim: bool,
    mean_batch: bool,
    where: str,
) -> None:
    """Run ``func`` on the first sample (and batch) of ``data`` and check the result.

    Args:
        func: the user's ``f(params_dict, data) -> scalar``.
        func_name: ``"loss_func"`` or ``"target_func"`` (for messages).
        model: the task's model (in its loaded state).
        params: ``{name: tensor}`` of the trainable parameters.
        data: one batch (tensors with the batch dimension first).
        keep_batch_dim: the attributor's convention (see :data:`SIGNATURES`).
        mean_batch: the function is also evaluated on whole batches as a MEAN loss
            (influence functions): check that it is not a sum.
        where: which batch, e.g. ``"the first batch of full_train_dataloader"``.

    Raises:
        ValueError: naming the cause and the fix (signature, argument order, dtype,
            labels, feature size, non-scalar result, a value that ignores ``params``).
    """
    expected = SIGNATURES[keep_batch_dim]
    tensors = tensors_of(data)
    if not tensors or tensors[0].dim() == 0 or tensors[0].shape[0] == 0:
        return
    sample = _map(data, lambda t: t[:1]) if keep_batch_dim else _map(data, lambda t: t[0])
    bind = _call_error(func, (params, sample))
    if bind is not None:
        try:
            sig = str(inspect.signature(func))
        except (TypeError, ValueError):
            sig = "(?)"
        msg = (
            f"{func_name} has the signature {sig}, which cannot be called as "
            f"{func_name}(params, data) ({bind}). Expected: {expected}."
        )
        raise ValueError(msg)
    leaves = {
        k: p.detach().requires_grad_(True) for k, p in params.items() if p.is_floating_point()
    }
    try:
        with torch.enable_grad():
            value = func({**params, **leaves}, sample)
    except Exception as err:
        try:
            swapped = func(sample, params)
        except Exception:
            swapped = None
        if isinstance(swapped, Tensor):
            msg = (
                f"{func_name} takes its arguments in the order (data, params); "
                f"dattri calls {func_name}(params, data). Expected: {expected}."
            )
            raise ValueError(msg) from err
        clear = explain_error(err, model=model, data=data, where=where, func_name=func_name)
        if clear is not None:
            raise clear from err
        msg = (
            f"{func_name} raised {type(err).__name__} on the first sample of {where}: "
            f"{err}. Expected: {expected}."
        )
        raise ValueError(msg) from err
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        msg = (
            f"{func_name} returned {shape} on one sample of {where}; it must return a "
            f"scalar. Expected: {expected}."
        )
        raise ValueError(msg)
    _check_uses_params(func_name, leaves, value, where)
    if mean_batch and tensors[0].shape[0] >= 1:
        with torch.no_grad():
            _check_mean(func, func_name, params, data, where)


def _check_uses_params(
    func_name: str, leaves: Mapping[str, Tensor], value: Tensor, where: str
) -> None:
    """Raise if no autograd path leads from the ``leaves`` to ``value`` (``model(x)``).

    Structural, so a saturated loss whose gradient happens to be 0 is not flagged.
    """
    if not leaves:
        return
    with torch.enable_grad():  # callers may run under torch.no_grad()
        used = value.requires_grad and any(
            g is not None
            for g in torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
        )
    if not used:
        msg = (
            f"{func_name} does not depend on the params it is given: on the first sample "
            f"of {where} no gradient flows from params to its value, so all gradients (and "
            "all scores) would be 0. It probably calls model(x) or detaches; call "
            "torch.func.functional_call(model, params, (x,)) instead."
        )
        raise ValueError(msg)


def _check_mean(
    func: Callable, func_name: str, params: Mapping[str, Tensor], data: Any, where: str
) -> None:
    """Warn if ``func`` on the batch duplicated is twice its value on the batch (a sum)."""
    try:
        once = func(params, data)
        twice = func(params, _map(data, lambda t: torch.cat([t, t])))
    except Exception:
        return
    if not (isinstance(once, Tensor) and isinstance(twice, Tensor)):
        return
    if once.numel() != 1 or twice.numel() != 1:
        return
    a, b = float(once), float(twice)
    if a != 0.0 and abs(b - 2.0 * a) <= _SUM_RTOL * abs(a) and abs(b - a) > _SUM_RTOL * abs(a):
        warnings.warn(
            f"{func_name} looks SUM-reduced: on {where} its value doubles when the batch "
            "is duplicated, but influence functions expect the MEAN loss of the batch "
            "(the Hessian and gradients are then scaled by the batch size and the scores "
            f"are wrong). Use reduction='mean' (the default of cross_entropy) in {func_name}.",
            UserWarning,
            stacklevel=4,
        )


#: message prefix of :func:`check_train_mode` (silenced by :func:`train_mode_ok`).
_TRAIN_MODE = "The model is in train mode after loading a checkpoint"


@contextmanager
def train_mode_ok() -> Iterator[None]:
    """Silence :func:`check_train_mode` where the caller sets the mode itself (RPS)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRAIN_MODE)
        yield


def check_train_mode(model: nn.Module, custom_loader: bool) -> None:
    """Warn if ``model`` is in train mode with active dropout or batch-norm.

    Args:
        model: the model just loaded.
        custom_loader: whether a user ``checkpoints_load_func`` loaded it.
    """
    active = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if m.training
        and (
            (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
            or isinstance(m, nn.modules.batchnorm._BatchNorm)
        )
    ]
    if not active:
        return
    who = "checkpoints_load_func" if custom_loader else "the model"
    warnings.warn(
        f"{_TRAIN_MODE} ({who} did not call "
        f"model.eval()): dropout/batch-norm modules {active[:5]} are active, so gradients "
        "are random and the scores wrong. Call model.eval() in checkpoints_load_func "
        "(and return the model).",
        UserWarning,
        stacklevel=4,
    )
