"""``AttributionTask``: the model, its loss/target functions and its checkpoints.

Every attributor takes an :class:`AttributionTask`. It owns

* the model (whose buffers, e.g. BatchNorm statistics, come from the currently loaded
  checkpoint; functional calls pass parameters only),
* the user's functional ``loss_func(params, data)`` and ``target_func(params, data)``
  (``params`` is a ``{name: tensor}`` dict for :func:`torch.func.functional_call`),
* one or more checkpoints (paths or state_dicts), loaded lazily.

Example:
    >>> def loss_func(params, data):
    ...     x, y = data
    ...     logits = torch.func.functional_call(model, params, (x,))
    ...     return torch.nn.functional.cross_entropy(logits, y)
    >>> task = AttributionTask(loss_func=loss_func, model=model,
    ...                        checkpoints=model.state_dict())
"""

from __future__ import annotations

import inspect
import numbers
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dattri.func.utils import flatten_func, normalize_layer_name, partial_param
from dattri.loss_checks import check_loss_on_batch, check_train_mode, explained_errors

__all__ = ["AttributionTask"]

Checkpoint = str | os.PathLike | Mapping[str, Any]


class _UnsupportedCombinationError(NotImplementedError, ValueError):
    """Unsupported argument combination (upstream raised NotImplementedError)."""


def _default_load(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """Load ``checkpoint`` (a path or a state_dict) into ``model`` and set eval mode."""
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as err:
            msg = (
                f"Checkpoint file {os.fspath(checkpoint)!r} is not a state_dict that "
                "torch.load(weights_only=True) can read (e.g. a whole pickled model, or a "
                "damaged file). Save torch.save(model.state_dict(), path), or pass "
                "checkpoints_load_func=f(model, checkpoint) -> model that loads this file "
                f"(and calls model.eval()). ({type(err).__name__}: {str(err).splitlines()[0]})"
            )
            raise ValueError(msg) from err
    else:
        state = checkpoint
    if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        # A training checkpoint such as {"model_state_dict": ..., "epoch": ...}.
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        msg = (
            "A checkpoint must be a path to a saved state_dict or a state_dict, got "
            f"{type(state).__name__}. Save checkpoints with "
            "torch.save(model.state_dict(), path), or pass checkpoints_load_func."
        )
        raise TypeError(msg)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        msg = (
            "The checkpoint does not match the model: missing keys "
            f"{list(result.missing_keys)}, unexpected keys "
            f"{list(result.unexpected_keys)}. Pass a checkpoint of this model, or a "
            "checkpoints_load_func that maps it."
        )
        raise ValueError(msg)
    model.eval()
    return model


def _same(entry: Checkpoint, checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` is the task's ``entry`` (equal path, or the same object)."""
    if isinstance(entry, (str, os.PathLike)) and isinstance(checkpoint, (str, os.PathLike)):
        return os.fspath(entry) == os.fspath(checkpoint)
    return entry is checkpoint


class AttributionTask:
    """A model, its loss and target functions, and its checkpoints.

    Args:
        loss_func: ``loss_func(params, data) -> scalar`` where ``params`` is a
            ``{name: tensor}`` dict (use :func:`torch.func.functional_call`). It is the
            training loss whose gradients/Hessians the attributors use. The per-sample
            shape it sees depends on the attributor (see the docs' data conventions).
        model: the ``nn.Module``; its trainable parameters (``requires_grad``) define
            the parameter space.
        checkpoints: a path, a state_dict, or a list of either.
        target_func: ``target_func(params, data) -> scalar``, the quantity on the test
            side whose change is attributed. Defaults to ``loss_func``.
        checkpoints_load_func: ``f(model, checkpoint) -> model``; defaults to loading a
            state_dict (``torch.load(..., weights_only=True)`` for paths) and
            ``model.eval()``.
    """

    def __init__(
        self,
        loss_func: Callable,
        model: nn.Module,
        checkpoints: Checkpoint | Sequence[Checkpoint],
        target_func: Callable | None = None,
        checkpoints_load_func: Callable[[nn.Module, Any], nn.Module] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}."
            raise TypeError(msg)
        if not callable(loss_func):
            msg = "loss_func must be callable: loss_func(params, data) -> scalar."
            raise TypeError(msg)
        if target_func is not None and not callable(target_func):
            msg = "target_func must be callable or None."
            raise TypeError(msg)
        self.model = model
        self.original_loss_func = loss_func
        self.original_target_func = target_func if target_func is not None else loss_func
        self.loss_func = flatten_func(model)(loss_func)
        self.target_func = flatten_func(model)(self.original_target_func)
        try:
            sig_params = list(inspect.signature(loss_func).parameters)
        except (TypeError, ValueError):
            sig_params = []
        self.loss_func_data_key = sig_params[1] if len(sig_params) > 1 else None

        if isinstance(checkpoints, (list, tuple)):
            self.checkpoints = list(checkpoints)
        else:
            self.checkpoints = [checkpoints]
        if not self.checkpoints:
            msg = "checkpoints is empty: pass at least one path or state_dict."
            raise ValueError(msg)
        self.checkpoints_load_func = checkpoints_load_func or _default_load
        self.current_checkpoint_idx: int | None = None
        self.named_parameters = self._trainable(model)
        self._grad_func_memo: dict[Any, Callable] = {}

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _trainable(model: nn.Module) -> dict[str, Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    @property
    def param_names(self) -> list[str]:
        """Names of the model's trainable parameters, in flattening order."""
        return list(self.named_parameters.keys())

    def load_checkpoint(self, index_or_ckpt: int | Checkpoint) -> nn.Module:
        """Load a checkpoint into the model and return the model.

        Args:
            index_or_ckpt: an index into :meth:`get_checkpoints` (negative indices
                count from the end; nothing is reloaded when that checkpoint is the
                one loaded), or a checkpoint itself (a path or a state_dict, e.g. one
                not in the task's list), which is always loaded with
                ``checkpoints_load_func``. A path equal to an entry of the task's
                list, or the very state_dict object of an entry, counts as that index.

        Returns:
            The model holding the checkpoint (``task.get_model()``), in eval mode
            unless ``checkpoints_load_func`` does otherwise.

        Raises:
            IndexError: for an index outside the task's checkpoints.
            TypeError: for anything that is neither an index, a path nor a mapping,
                or when ``checkpoints_load_func`` returns no ``nn.Module``.
        """
        if isinstance(index_or_ckpt, bool) or not isinstance(
            index_or_ckpt, (numbers.Integral, str, os.PathLike, Mapping)
        ):
            msg = (
                "load_checkpoint(index_or_ckpt) takes a checkpoint index (int), a path "
                f"or a state_dict, got {type(index_or_ckpt).__name__}."
            )
            raise TypeError(msg)
        if isinstance(index_or_ckpt, numbers.Integral):
            ckpt_idx = int(index_or_ckpt)
        else:
            ckpt_idx = next(
                (i for i, c in enumerate(self.checkpoints) if _same(c, index_or_ckpt)), None
            )
            if ckpt_idx is None:
                self._load(index_or_ckpt, None)
                return self.model
        if not -len(self.checkpoints) <= ckpt_idx < len(self.checkpoints):
            msg = (
                f"ckpt_idx={ckpt_idx} is out of range: the task has "
                f"{len(self.checkpoints)} checkpoint(s)."
            )
            raise IndexError(msg)
        ckpt_idx %= len(self.checkpoints)
        if self.current_checkpoint_idx != ckpt_idx:
            self._load(self.checkpoints[ckpt_idx], ckpt_idx)
        return self.model

    def _load(self, checkpoint: Checkpoint, ckpt_idx: int | None) -> None:
        """Run ``checkpoints_load_func``; record the index loaded (None: not in the list)."""
        self.current_checkpoint_idx = None  # unknown state if loading fails half-way
        model = self.checkpoints_load_func(self.model, checkpoint)
        if not isinstance(model, nn.Module):
            msg = "checkpoints_load_func must return the loaded nn.Module."
            raise TypeError(msg)
        self.model = model
        self.named_parameters = self._trainable(model)
        self.current_checkpoint_idx = ckpt_idx
        check_train_mode(model, self.checkpoints_load_func is not _default_load)

    def _index(self, ckpt_idx: Any) -> int:
        """Check that ``ckpt_idx`` is a checkpoint index (not a path or a state_dict)."""
        if isinstance(ckpt_idx, bool) or not isinstance(ckpt_idx, numbers.Integral):
            msg = (
                f"ckpt_idx={ckpt_idx!r} is not a checkpoint index: pass an int in "
                f"[0, {len(self.checkpoints)}) (load_checkpoint also takes a path or a "
                "state_dict)."
            )
            raise IndexError(msg)
        return int(ckpt_idx)

    def _load_checkpoints(self, ckpt_idx: int) -> None:
        """Upstream's private name of :meth:`load_checkpoint` (index only; kept as an alias).

        Args:
            ckpt_idx: checkpoint index.
        """
        self.load_checkpoint(self._index(ckpt_idx))

    def get_checkpoints(self) -> list[Checkpoint]:
        """Return the list of checkpoints."""
        return self.checkpoints

    def get_model(self) -> nn.Module:
        """Return the model (with the most recently loaded checkpoint)."""
        return self.model

    def register_forward_hook(self, layer_name: str) -> None:
        """Not provided: attributors that need activations register their own hooks.

        Raises:
            NotImplementedError: always; use ``dattri.func.per_sample_grad`` or
                ``torch.nn.Module.register_forward_hook`` on ``task.get_model()``.
        """
        msg = (
            "AttributionTask.register_forward_hook is not provided: register hooks on "
            "task.get_model() directly, or use dattri.func.per_sample_grad which "
            "captures layer activations itself."
        )
        raise NotImplementedError(msg)

    # --------------------------------------------------------------- parameters
    def selected_param_names(self, layer_name: str | Sequence[str] | None) -> list[str]:
        """Validate ``layer_name`` and return the selected parameter names.

        Args:
            layer_name: None (all), one parameter name, or a list of names.

        Returns:
            The list of selected names (all names when ``layer_name`` is None).
        """
        names = normalize_layer_name(layer_name, self.param_names)
        return self.param_names if names is None else names

    @staticmethod
    def _generate_param_layer_map(named_parameters: Mapping[str, Tensor]) -> list[int]:
        """Group consecutive parameters by module prefix: ``[0, 0, 1, 1]`` for w,b,w,b."""
        layer_map: list[int] = []
        prev = None
        idx = -1
        for name in named_parameters:
            prefix = name.rsplit(".", 1)[0] if "." in name else name
            if prefix != prev:
                idx += 1
                prev = prefix
            layer_map.append(idx)
        return layer_map

    def get_param(
        self,
        ckpt_idx: int = 0,
        layer_name: str | Sequence[str] | None = None,
        layer_split: bool = False,
        param_layer_map: Sequence[int] | None = None,
    ) -> tuple[Tensor | tuple[Tensor, ...], list[int] | None]:
        """Return the (selected) parameters of a checkpoint, flattened.

        Args:
            ckpt_idx: checkpoint index.
            layer_name: None (all), a parameter name, or a list of names (order kept).
            layer_split: return a tuple of per-parameter flat tensors instead of one
                flat tensor, together with a layer map.
            param_layer_map: explicit layer index per selected parameter (only with
                ``layer_split``); default groups parameters by module prefix.

        Returns:
            ``(flat_params, None)`` of shape ``(p,)``, or
            ``(tuple_of_flat_params, param_layer_map)`` when ``layer_split``.

        Raises:
            ValueError: if ``param_layer_map`` has the wrong length.
        """
        self.load_checkpoint(self._index(ckpt_idx))
        names = self.selected_param_names(layer_name)
        selected = {n: self.named_parameters[n] for n in names}
        if layer_split:
            if param_layer_map is None:
                param_layer_map = self._generate_param_layer_map(selected)
            elif len(param_layer_map) != len(selected):
                msg = (
                    f"param_layer_map has {len(param_layer_map)} entries but "
                    f"{len(selected)} parameters are selected."
                )
                raise ValueError(msg)
            return tuple(p.detach().reshape(-1) for p in selected.values()), list(param_layer_map)
        return torch.cat([p.detach().reshape(-1) for p in selected.values()]), None

    def get_param_dict(self, ckpt_idx: int = 0) -> dict[str, Tensor]:
        """Return ``{name: detached tensor}`` of all trainable parameters of a checkpoint."""
        self.load_checkpoint(self._index(ckpt_idx))
        return {n: p.detach() for n, p in self.named_parameters.items()}

    # ---------------------------------------------------------------- functions
    def _select_func(
        self,
        func: Callable,
        original: Callable,
        flatten: bool,
        layer_name: str | Sequence[str] | None,
        ckpt_idx: int | None,
    ) -> Callable:
        if not flatten:
            if layer_name is not None:
                msg = "flatten=False cannot be combined with layer_name."
                raise _UnsupportedCombinationError(msg)
            return original
        if layer_name is None:
            return func
        self.load_checkpoint(0 if ckpt_idx is None else self._index(ckpt_idx))
        names = self.selected_param_names(layer_name)
        full = {n: p.detach() for n, p in self.named_parameters.items()}
        return partial_param(full, names)(func)

    def get_loss_func(
        self,
        flatten: bool = True,
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int | None = None,
    ) -> Callable:
        """Return the loss function.

        Args:
            flatten: if True, the function takes flat parameters ``(p,)``; else the
                user's dict-form function is returned unchanged.
            layer_name: restrict the flat parameters to these parameter(s); the rest
                are frozen at checkpoint ``ckpt_idx``.
            ckpt_idx: checkpoint used for the frozen parameters (default 0).

        Returns:
            ``f(params, data) -> scalar``.
        """
        return self._select_func(
            self.loss_func, self.original_loss_func, flatten, layer_name, ckpt_idx
        )

    def get_target_func(
        self,
        flatten: bool = True,
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int | None = None,
    ) -> Callable:
        """Return the target function (same arguments as :meth:`get_loss_func`)."""
        return self._select_func(
            self.target_func, self.original_target_func, flatten, layer_name, ckpt_idx
        )

    def _grad_func(
        self,
        which: str,
        in_dims: tuple,
        layer_name: str | Sequence[str] | None,
        ckpt_idx: int | None,
    ) -> Callable:
        key = (
            which,
            tuple(in_dims),
            None if layer_name is None else tuple(self.selected_param_names(layer_name)),
            ckpt_idx if layer_name is not None else None,
        )
        if key not in self._grad_func_memo:
            getter = self.get_loss_func if which == "loss" else self.get_target_func
            func = getter(layer_name=layer_name, ckpt_idx=ckpt_idx)
            self._grad_func_memo = {
                key: torch.func.vmap(torch.func.grad(func), in_dims=in_dims, randomness="different")
            }
        return self._grad_func_memo[key]

    def get_grad_loss_func(
        self,
        in_dims: tuple = (None, 1),
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int | None = None,
    ) -> Callable:
        """Per-sample gradient of the loss: ``vmap(grad(loss), in_dims)``.

        Args:
            in_dims: vmap ``in_dims``; the default ``(None, 1)`` expects data
                pre-unsqueezed to ``(1, B, ...)`` so the loss sees ``(1, ...)``.
            layer_name: restrict to these parameter(s).
            ckpt_idx: checkpoint for frozen parameters when ``layer_name`` is given.

        Returns:
            ``f(params, data) -> (B, p_selected)``.
        """
        return self._grad_func("loss", in_dims, layer_name, ckpt_idx)

    def get_grad_target_func(
        self,
        in_dims: tuple = (None, 1),
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int | None = None,
    ) -> Callable:
        """Per-sample gradient of the target (see :meth:`get_grad_loss_func`)."""
        return self._grad_func("target", in_dims, layer_name, ckpt_idx)

    def per_sample_grads(
        self,
        data: Any,
        ckpt_idx: int = 0,
        layer_name: str | Sequence[str] | None = None,
        target: bool = False,
        keep_batch_dim: bool = False,
        route: str = "auto",
        chunk_size: int | None = None,
        *,
        out: Tensor | None = None,
        check_finite: bool = True,
        where: str = "a batch",
    ) -> Tensor:
        """Per-sample gradients of the loss (or target) for one batch.

        Uses the fast hook route of :func:`dattri.func.per_sample_grad.per_sample_grad`
        where every selected parameter belongs to a supported layer, and
        ``vmap(grad)`` otherwise.

        Args:
            data: one batch (tensor, tuple/list or dict of tensors with batch dim B).
            ckpt_idx: checkpoint index.
            layer_name: None (all), a parameter name, or a list of names.
            target: differentiate ``target_func`` instead of ``loss_func``.
            keep_batch_dim: whether the user's function sees a sample as ``(1, ...)``
                (IF convention) rather than un-batched (TRAK/TracIn convention).
            route: ``"auto"``, ``"hook"`` or ``"vmap"``.
            chunk_size: maximum samples per vmap chunk.
            out: optional contiguous ``(B, p_selected)`` buffer to write into (see
                :func:`dattri.func.per_sample_grad.per_sample_grad`).
            check_finite: raise on NaN/inf gradients (default True).
            where: the batch, named in the error raised for bad data (labels outside
                the model's classes, wrong feature size, float labels, dtype mismatch).

        Returns:
            ``(B, p_selected)`` gradients (``out`` when given), columns in
            ``layer_name`` order.
        """
        from dattri.func.per_sample_grad import per_sample_grad

        self.load_checkpoint(self._index(ckpt_idx))
        names = self.selected_param_names(layer_name)
        params = {n: p.detach() for n, p in self.named_parameters.items()}
        func = self.original_target_func if target else self.original_loss_func
        with explained_errors(self.model, data, where, "target_func" if target else "loss_func"):
            return per_sample_grad(
                self.model,
                func,
                params,
                data,
                param_names=names,
                keep_batch_dim=keep_batch_dim,
                route=route,
                chunk_size=chunk_size,
                out=out,
                check_finite=check_finite,
            )

    def check_functions(
        self,
        data: Any,
        *,
        keep_batch_dim: bool,
        mean_batch: bool = False,
        target: bool = False,
        where: str = "the first batch",
        ckpt_idx: int | None = 0,
    ) -> None:
        """Check ``loss_func`` (or ``target_func``) on one batch, cheaply.

        Runs the function on the first sample of ``data`` (and, with ``mean_batch``,
        on the batch and the batch duplicated) and raises a ``ValueError`` naming the
        cause and the fix for a wrong signature, ``(data, params)`` order, non-scalar
        value, a value that ignores ``params`` (e.g. ``model(x)``), labels outside the
        model's classes, float labels, dtype or feature-size mismatches; warns when a
        mean loss looks sum-reduced. Eager losses ``f(model, batch, device)`` are
        skipped.

        Args:
            data: one batch.
            keep_batch_dim: the attributor's per-sample convention.
            mean_batch: the loss is also used as the mean loss of whole batches.
            target: check ``target_func`` (for test data) instead of ``loss_func``.
            where: the batch, for messages.
            ckpt_idx: the checkpoint whose parameters are used; None uses the model's
                current parameters without loading anything (e.g. during training).
        """
        if ckpt_idx is not None:
            self.load_checkpoint(self._index(ckpt_idx))
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        if target:
            same = self.original_target_func is self.original_loss_func
            name = "loss_func (the default target_func)" if same else "target_func"
            funcs = [(name, self.original_target_func, False)]
        else:
            funcs = [("loss_func", self.original_loss_func, mean_batch)]
        for name, func, mean in funcs:
            try:
                positional = [
                    p
                    for p in inspect.signature(func).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ]
            except (TypeError, ValueError):
                positional = []
            third = positional[2] if len(positional) > 2 else None
            if third is not None and (third.default is third.empty or third.name == "device"):
                continue  # eager f(model, batch, device) (LoGra/DVEmb conventions)
            check_loss_on_batch(
                func,
                name,
                self.model,
                params,
                data,
                keep_batch_dim=keep_batch_dim,
                mean_batch=mean,
                where=where,
            )

    def grad_layout(
        self, layer_name: str | Sequence[str] | None = None
    ) -> tuple[int, torch.dtype, torch.device]:
        """Columns, dtype and device of :meth:`per_sample_grads` for ``layer_name``.

        Returns:
            ``(p_selected, dtype, device)``: the promoted dtype of the selected
            parameters and the device of the first one.
        """
        names = self.selected_param_names(layer_name)
        params = self.named_parameters
        dtype = params[names[0]].dtype
        for n in names[1:]:
            dtype = torch.promote_types(dtype, params[n].dtype)
        return sum(params[n].numel() for n in names), dtype, params[names[0]].device

    def num_params(self, layer_name: str | Sequence[str] | None = None) -> int:
        """Number of selected trainable parameters."""
        return sum(self.named_parameters[n].numel() for n in self.selected_param_names(layer_name))
