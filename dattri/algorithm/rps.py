"""Representer point selection (Yeh et al., NeurIPS 2018).

The last linear layer ``phi = theta f`` of the model (``f`` = its input features)
is refitted with an L2 penalty to the model's own predictions,

``theta* = argmin (1/n) sum_i l(theta f_i, t_i) + lambda ||theta||^2``,

and the representer theorem then writes every pre-activation as a sum over the
training samples: ``phi(x_t) = theta* f_t = sum_i alpha_i <f_i, f_t>`` with
``alpha_i = -1/(2 lambda n) dl(phi_i, t_i)/dphi_i`` (one weight per class). The
score of training sample ``i`` for test sample ``t`` is its term in the test label's
pre-activation, ``alpha_i[y_t] <f_i, f_t>``; summed over the training set used for
the fit the scores give back the fitted logit exactly (up to the fit's tolerance).
See :mod:`dattri.algorithm.utils` for the fit.

Bias: if the layer has a bias, a constant 1 is appended to the features and the bias
is fitted (and L2-penalised) together with the weight, so ``<f_i, f_t>`` includes
``+1``. ``normalize_preactivate=True`` L2-normalises the features before that, in the
fit and in the scores alike (so the decomposition stays exact).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.runtime.batching import check_loader, iterate, move_to_device
from dattri.algorithm.runtime.validation import require_reiterable, resolve_device
from dattri.algorithm.utils import RPS_SOLVERS, rps_alpha, rps_finetune_theta
from dattri.loss_checks import explained_errors, train_mode_ok
from dattri.task import AttributionTask

__all__ = ["RPSAttributor"]


class RPSAttributor(BaseAttributor):
    """Representer point selection on the last linear layer.

    Batches: ``(x, y)`` tuples/lists (the model is called as ``model(x)``; with more
    than two elements as ``model(*batch[:-1])``; the label is the last element) or
    dicts (``model(**inputs)`` with every key except ``label_key``; the label is
    ``batch[label_key]``). Labels are only needed to pick the class of each test
    sample (and for :meth:`self_attribute`); single-output (binary) models need none.

    The task's target function (the loss if no target was given) is used as
    ``L(logits (B, C), targets (B, C)) -> scalar``, e.g. ``F.cross_entropy`` (soft
    targets) or ``F.binary_cross_entropy_with_logits``; its reduction does not matter
    (it is applied one sample at a time under ``vmap``). With several checkpoints the
    scores are averaged over checkpoints (one fit per checkpoint).

    Args:
        task: the attribution task (model and checkpoints).
        final_linear_layer_name: module name of the last ``nn.Linear`` (nested names
            such as ``"head.fc"`` allowed).
        normalize_preactivate: L2-normalise the layer inputs (features).
        l2_strength: ``lambda`` of the fit, ``> 0``.
        epoch: maximum iterations of the fit.
        device: device of the fit and the scores (the model runs on its own device).
        verbose: show progress bars.
        label_key: label entry of dict batches.
        solver: ``"lbfgs"`` (default) or ``"gd"``, see
            :func:`~dattri.algorithm.utils.rps_finetune_theta`.
    """

    def __init__(
        self,
        task: AttributionTask,
        final_linear_layer_name: str,
        normalize_preactivate: bool = False,
        l2_strength: float = 0.003,
        epoch: int = 3000,
        device: str | torch.device = "cpu",
        verbose: bool = True,
        *,
        label_key: str = "labels",
        solver: str = "lbfgs",
    ) -> None:
        if not isinstance(task, AttributionTask):
            msg = f"task must be a dattri.task.AttributionTask, got {type(task).__name__}."
            raise TypeError(msg)
        if not isinstance(l2_strength, (int, float)) or not l2_strength > 0:
            msg = f"l2_strength must be a positive number, got {l2_strength!r}."
            raise ValueError(msg)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            msg = f"epoch must be a positive int, got {epoch!r}."
            raise ValueError(msg)
        if solver not in RPS_SOLVERS:
            msg = f"solver must be one of {RPS_SOLVERS}, got {solver!r}."
            raise ValueError(msg)
        self.task = task
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = normalize_preactivate
        self.l2_strength = float(l2_strength)
        self.epoch = epoch
        self.device = resolve_device(device)
        self.verbose = verbose
        self.label_key = label_key
        self.solver = solver
        self.loss_func = task.get_target_func(flatten=False)
        with train_mode_ok():  # RPS runs the model in eval mode itself
            task.load_checkpoint(0)
        self._layer()  # validates the name
        #: fitted ``(C, d [+1])`` weights, one per checkpoint (bias as last column).
        self.theta: list[Tensor] = []
        #: number of samples in the fit.
        self.n_train: int | None = None

    # --------------------------------------------------------------- helpers
    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints of the task."""
        return len(self.task.get_checkpoints())

    def _layer(self) -> nn.Linear:
        model = self.task.get_model()
        name = self.final_linear_layer_name
        if not isinstance(name, str):
            msg = f"final_linear_layer_name must be a module name (str), got {type(name).__name__}."
            raise TypeError(msg)
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            msg = (
                f"final_linear_layer_name {name!r} is not a module of the model; "
                f"Linear layers: {names}."
            )
            raise ValueError(msg) from exc
        if not isinstance(layer, nn.Linear):
            msg = f"final_linear_layer_name {name!r} is a {type(layer).__name__}, not nn.Linear."
            raise TypeError(msg)
        return layer

    def _labels(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                msg = (
                    f"dict batch has no label entry {self.label_key!r} (keys {list(batch)}); "
                    "set label_key=..."
                )
                raise ValueError(msg)
            return batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1]
        msg = "RPS needs labels: use (x, y) batches or dict batches with label_key."
        raise ValueError(msg)

    def _forward(self, model: nn.Module, batch: Any) -> None:
        if isinstance(batch, Mapping):
            model(**{k: v for k, v in batch.items() if k != self.label_key})
        elif isinstance(batch, (tuple, list)) and len(batch) > 2:
            model(*batch[:-1])
        elif isinstance(batch, (tuple, list)):
            model(batch[0])
        else:
            model(batch)

    def _collect(
        self, loader: Iterable, ckpt_idx: int, name: str, labels: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Layer inputs ``(n, d)``, outputs ``(n, C)`` and optionally labels ``(n,)``."""
        check_loader(loader, name)
        with train_mode_ok():  # eval mode is set below
            self.task.load_checkpoint(ckpt_idx)
        model, layer = self.task.get_model(), self._layer()
        try:
            model_device = next(model.parameters()).device
        except StopIteration:
            model_device = self.device
        feats: list[Tensor] = []
        outs: list[Tensor] = []
        labs: list[Tensor] = []

        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            feats.append(args[0].detach().to(self.device))
            outs.append(out.detach().to(self.device))

        was_training = model.training
        handle = layer.register_forward_hook(hook)
        model.eval()
        try:
            with torch.no_grad():
                for batch in iterate(loader, f"RPS features ({name})", self.verbose):
                    count = len(feats)
                    with explained_errors(model, batch, f"a batch of {name}", "the model"):
                        self._forward(model, move_to_device(batch, model_device))
                    if len(feats) != count + 1:
                        msg = (
                            f"Layer {self.final_linear_layer_name!r} was called "
                            f"{len(feats) - count} times in one forward; RPS needs exactly one."
                        )
                        raise ValueError(msg)
                    if labels:
                        labs.append(self._labels(batch).to(self.device).reshape(-1))
        finally:
            handle.remove()
            model.train(was_training)
        f, o = torch.cat(feats), torch.cat(outs)
        if f.ndim != 2:
            msg = (
                f"The input of {self.final_linear_layer_name!r} has shape {tuple(f.shape[1:])} "
                "per sample; RPS needs flat (d,) features (no sequence dimension)."
            )
            raise ValueError(msg)
        return f, o, torch.cat(labs) if labels else None

    def _features(self, f: Tensor) -> Tensor:
        """Feature map of the fit: optional normalisation, ones column for the bias."""
        f = f.to(torch.float64)
        if self.normalize_preactivate:
            f = F.normalize(f, dim=1)
        if self._layer().bias is not None:
            f = torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)
        return f

    # ---------------------------------------------------------------- phases
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Fit the last layer on the training set (one fit per checkpoint).

        Args:
            full_train_dataloader: the training data of the fit (``n`` samples).
        """
        require_reiterable(full_train_dataloader, "full_train_dataloader", "RPSAttributor")
        thetas = []
        for k in range(self.num_checkpoints):
            f, o, _ = self._collect(full_train_dataloader, k, "full_train_dataloader", False)
            layer = self._layer()
            init = layer.weight.detach()
            if layer.bias is not None:
                init = torch.cat([init, layer.bias.detach().unsqueeze(1)], dim=1)
            x = self._features(f)
            thetas.append(
                rps_finetune_theta(
                    x,
                    o.to(torch.float64),
                    init.to(x),
                    self.loss_func,
                    self.l2_strength,
                    self.epoch,
                    self.device,
                    solver=self.solver,
                )
            )
            self.n_train = x.shape[0]
        self.theta = thetas

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if self.theta:
            return
        warnings.warn(
            "RPSAttributor: cache() was not called; fitting the last layer on train_dataloader.",
            UserWarning,
            stacklevel=3,
        )
        self.cache(train_dataloader)

    def _train_side(self, loader: Iterable, k: int, labels: bool) -> tuple:
        f, o, y = self._collect(loader, k, "train_dataloader", labels)
        x = self._features(f)
        alpha = rps_alpha(
            self.theta[k], self.loss_func, x, o.to(torch.float64), self.l2_strength, self.n_train
        )
        return x, alpha, y, f.dtype

    def attribute(self, train_dataloader: Iterable, test_dataloader: Iterable) -> Tensor:
        """Representer values of every (train, test) pair.

        Args:
            train_dataloader: training samples (rows); for the exact decomposition, the
                samples of the fit.
            test_dataloader: test samples (columns); labels pick the class.

        Returns:
            ``(n_train, n_test)``: ``alpha_i[y_t] <f_i, f_t>`` (single output:
            ``alpha_i <f_i, f_t>``), mean over checkpoints, in the model's dtype.
        """
        self._ensure_cached(train_dataloader)
        total = None
        for k in range(self.num_checkpoints):
            x, alpha, _, dtype = self._train_side(train_dataloader, k, False)
            f_te, _, y_te = self._collect(test_dataloader, k, "test_dataloader", alpha.shape[1] > 1)
            kern = x @ self._features(f_te).T
            if alpha.shape[1] > 1:
                self._check_labels(y_te, alpha.shape[1])
                score = kern * alpha[:, y_te.long()]
            else:
                score = kern * alpha
            total = score if total is None else total + score
        return (total / self.num_checkpoints).to(dtype)

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Representer value of each training sample for itself.

        Args:
            train_dataloader: training samples (with labels for multi-class models).

        Returns:
            ``(n_train,)``, equal to ``attribute(train, train).diag()``.
        """
        self._ensure_cached(train_dataloader)
        total = None
        for k in range(self.num_checkpoints):
            x, alpha, y, dtype = self._train_side(train_dataloader, k, True)
            if alpha.shape[1] > 1:
                self._check_labels(y, alpha.shape[1])
                a = alpha.gather(1, y.long().unsqueeze(1)).squeeze(1)
            else:
                a = alpha[:, 0]
            val = (x * x).sum(dim=1) * a
            total = val if total is None else total + val
        return (total / self.num_checkpoints).to(dtype)

    @staticmethod
    def _check_labels(y: Tensor | None, num_classes: int) -> None:
        if y is None or y.is_floating_point() or y.is_complex():
            msg = "RPS test labels must be integer class indices (one per sample)."
            raise ValueError(msg)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            msg = (
                f"RPS labels must lie in [0, {num_classes}); got range "
                f"[{int(y.min())}, {int(y.max())}]."
            )
            raise ValueError(msg)
