"""Input validation shared by the attributors (one place, cheap, first batch only).

Every attributor calls these helpers instead of keeping its own copies:

* :func:`check_task` - the ``task`` argument is an :class:`~dattri.task.AttributionTask`;
* :func:`resolve_device` - ``device="cuda"`` without CUDA is a clear error;
* :func:`require_reiterable` - a single-pass generator where the data is read twice;
* :func:`validate_loader` - the user's functions on the first batch of a loader
  (:meth:`dattri.task.AttributionTask.check_functions`: signature, argument order,
  a loss that ignores ``params``, a sum-reduced mean loss, labels, dtype, feature size);
* :func:`explain_batches` - after a raw error over many cached batches, find the
  batch that fails and raise a clear error naming it;
* :func:`scan_huge_values` - warn about a huge finite input (``|x| >= 1e8``) that makes
  gradients, features and kernels overflow or swamp every other sample;
* :func:`warn_topk` - ``k`` larger than the number of training samples.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HUGE_INPUT",
    "check_task",
    "explain_batches",
    "is_single_pass",
    "require_reiterable",
    "required_positional_args",
    "resolve_device",
    "resolve_regularization",
    "scan_huge_values",
    "validate_loader",
    "warn_topk",
]

#: inputs at least this large (in absolute value) are reported by :func:`scan_huge_values`:
#: products of two such gradients reach ``1e16``, beyond the float64 precision (``2e-16``)
#: left for the O(1) contributions of the other samples, and overflow float32 at ``1e19``.
HUGE_INPUT = 1e8


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, raising a clear error if its backend is unavailable.

    Args:
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Returns:
        The device.

    Raises:
        ValueError: for an unknown device string or an unavailable CUDA/MPS device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = f"device={device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:0')."
        raise ValueError(msg) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            msg = (
                f"device={device!r} but CUDA is not available on this machine (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda}). Pass device='cpu' "
                "or install a CUDA build of torch."
            )
            raise ValueError(msg)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            msg = (
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible."
            )
            raise ValueError(msg)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device={device!r} but MPS is not available; pass device='cpu'."
        raise ValueError(msg)
    return dev


def is_single_pass(loader: Any) -> bool:
    """Whether ``loader`` is an iterator (a generator): iterating it consumes it."""
    return isinstance(loader, Iterator)


def require_reiterable(loader: Any, name: str, who: str) -> None:
    """Raise if ``loader`` is a single-pass iterator where it is read more than once.

    Args:
        loader: the argument.
        name: its name, e.g. ``"full_train_dataloader"``.
        who: the attributor, e.g. ``"IFAttributorCG"``.

    Raises:
        TypeError: for a generator or other iterator.
    """
    if is_single_pass(loader):
        msg = (
            f"{name} is a single-pass iterator ({type(loader).__name__}): {who} reads the "
            "training data more than once (cache() and attribute()), so it must be "
            "re-iterable. Pass a DataLoader or a list of batches (list(generator))."
        )
        raise TypeError(msg)


def validate_loader(
    task: Any,
    loader: Iterable,
    name: str,
    *,
    keep_batch_dim: bool,
    mean_batch: bool = False,
    target: bool = False,
    ckpt_idx: int | None = 0,
) -> None:
    """Check the task's loss (or target) function on the first batch of ``loader``.

    Skipped for single-pass iterators (peeking would consume a batch).

    Args:
        task: the :class:`~dattri.task.AttributionTask`.
        loader: the data.
        name: argument name for messages.
        keep_batch_dim: the attributor's per-sample convention.
        mean_batch: the loss is also the mean loss of whole batches (IF family).
        target: check ``target_func`` (test loaders) instead of ``loss_func``.
        ckpt_idx: checkpoint to load first, or None for the model as it is.
    """
    if is_single_pass(loader) or not hasattr(task, "check_functions"):
        return
    key = (id(loader), keep_batch_dim, mean_batch, target)
    done = task.__dict__.setdefault("_validated_loaders", {})
    ref = done.get(key)
    if ref is not None and ref() is loader:  # checked before (per loader and convention)
        return
    try:
        first = next(iter(loader))
    except StopIteration:
        return
    task.check_functions(
        first,
        keep_batch_dim=keep_batch_dim,
        mean_batch=mean_batch,
        target=target,
        where=f"batch 0 of {name}",
        ckpt_idx=ckpt_idx,
    )
    with contextlib.suppress(TypeError):  # lists etc. (no weakref): peeking again is cheap
        done[key] = weakref.ref(loader)


def explain_batches(
    err: BaseException,
    task: Any,
    func: Callable[[Any], Any],
    batches: Sequence[Any],
    name: str,
    func_name: str = "loss_func",
) -> BaseException:
    """After a raw error over ``batches``, find the first failing one and explain it.

    Args:
        err: the raw error.
        task: the task (its model sizes the messages).
        func: ``func(batch)`` re-evaluates the user's function on one batch.
        batches: the batches (e.g. an IF attributor's cached training batches).
        name: the loader's argument name.
        func_name: the user's function.

    Returns:
        A clear ``ValueError`` (raise it ``from err``), or ``err`` itself.
    """
    from dattri.loss_checks import explain_error, tensors_of

    row = 0
    for b, batch in enumerate(batches):
        try:
            with torch.no_grad():
                func(batch)
        except Exception as inner:
            clear = explain_error(
                inner,
                model=task.get_model(),
                data=batch,
                where=f"batch {b} of {name}",
                func_name=func_name,
                first_row=row,
            )
            return clear if clear is not None else err
        tensors = tensors_of(batch)
        row += int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0
    return err


def scan_huge_values(item: Any, desc: str, row0: int, indices: Tensor | None = None) -> bool:
    """Warn (once) if a floating tensor of ``item`` holds ``|value| >= HUGE_INPUT``.

    Values equal to the dtype's largest finite number (additive attention masks)
    are ignored.

    Args:
        item: a batch, or a tuple containing one (e.g. ``(index, batch)``).
        desc: the loop, e.g. ``"train gradients"``.
        row0: samples seen before this batch in the loop.
        indices: optional dataset index of each row (named instead of the position).

    Returns:
        Whether a warning was issued.
    """
    from dattri.loss_checks import tensors_of

    for t in tensors_of(item):
        if not t.is_floating_point() or t.dim() == 0 or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.detach())  # no temporary copy of the batch
        if not (float(hi) >= HUGE_INPUT or float(lo) <= -HUGE_INPUT):
            continue
        mag = t.detach().abs()
        big = (mag >= HUGE_INPUT) & torch.isfinite(mag) & (mag < torch.finfo(t.dtype).max)
        rows = big.reshape(t.shape[0], -1).any(dim=1)
        if bool(rows.any()):
            r = int(rows.nonzero()[0, 0])
            value = float(mag[r].reshape(-1).max())
            sample = int(indices.reshape(-1)[r]) if indices is not None else row0 + r
            warnings.warn(
                f"Sample {sample} (row {r} of its batch) of the data iterated for "
                f"'{desc}' has an input of magnitude {value:.3g}: its gradients, features "
                "and kernel/Hessian products overflow or swamp every other sample in "
                "floating point, so the scores are not reliable. Normalise the inputs "
                "(or drop the sample).",
                UserWarning,
                stacklevel=4,
            )
            return True
    return False


def batch_rows(item: Any) -> int:
    """Samples in a batch (0 if it holds no tensor)."""
    from dattri.loss_checks import tensors_of

    for t in tensors_of(item):
        if t.dim() > 0:
            return int(t.shape[0])
    return 0


def warn_topk(k: int, n_kept: int) -> None:
    """Warn when ``k`` exceeds the number of training samples that were scored."""
    if n_kept < k:
        warnings.warn(
            f"attribute_topk: k={k} is larger than the number of training samples "
            f"({n_kept}); returning {n_kept} per side.",
            UserWarning,
            stacklevel=4,
        )


def first_of(batch: Any) -> Tensor | None:
    """The first tensor of a batch, or None."""
    from dattri.loss_checks import tensors_of

    tensors = tensors_of(batch)
    return tensors[0] if tensors else None


def resolve_regularization(
    regularization: float | None, alias: float | None, alias_name: str, alias_default: float | None
) -> float | None:
    """The one damping value of a method that also takes upstream's name for it.

    ``regularization`` (``lambda`` in ``(H + lambda I)^{-1}``) is the library-wide name;
    ``alias_name`` (e.g. EK-FAC's ``damping``) is upstream's. Passing both, with
    different values, is refused.

    Args:
        regularization: the value passed as ``regularization`` (None: not passed).
        alias: the value passed under ``alias_name``.
        alias_name: upstream's argument name.
        alias_default: the alias's default (meaning "not passed").

    Returns:
        The value to use.

    Raises:
        ValueError: if both are passed with different values.
    """
    if regularization is None:
        return alias
    if alias != alias_default and alias != regularization:
        msg = (
            f"regularization={regularization!r} and {alias_name}={alias!r} name the same "
            f"damping; pass only one (regularization is the library-wide name, {alias_name} "
            "upstream's)."
        )
        raise ValueError(msg)
    return regularization


def check_task(task: Any, layer_name: Any = None) -> Any:
    """Validate an attributor's ``task`` (and its ``layer_name`` selection) in one place.

    Args:
        task: must be a :class:`~dattri.task.AttributionTask`.
        layer_name: None, one parameter name or a list of names of the task's model.

    Returns:
        ``task``.

    Raises:
        TypeError: if ``task`` is not an ``AttributionTask``.
        ValueError: for an unknown or repeated parameter name (the task's message).
    """
    from dattri.task import AttributionTask

    if not isinstance(task, AttributionTask):
        msg = f"task must be a dattri.task.AttributionTask, got {type(task).__name__}."
        raise TypeError(msg)
    if layer_name is not None:
        task.selected_param_names(layer_name)
    return task


def required_positional_args(func: Callable) -> int:
    """Number of required positional parameters of ``func`` (``-1`` if unknown).

    Args:
        func: any callable.

    Returns:
        The count of positional parameters without a default.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return -1
    return sum(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in sig.parameters.values()
    )
