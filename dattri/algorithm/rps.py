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

Pipeline: :class:`~dattri.algorithm.features.last_layer.LastLayerFeaturizer` gives the
per-sample rows ``[f_i, phi_i]`` of the training set (in memory, in the resumable
memmap store with ``cache_dir``, sharded over torch.distributed ranks); the fit uses
all rows; scores are produced in ``(train block, test block)`` tiles (sizes from
``max_memory``) into a sink: a tensor, a ``.npy`` file (``out=``) or a streaming top-k.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.last_layer import LastLayerFeaturizer
from dattri.algorithm.runtime.batching import check_loader
from dattri.algorithm.runtime.distributed import gather_rows, is_distributed
from dattri.algorithm.runtime.validation import require_reiterable
from dattri.algorithm.score.tiles import (
    ScoreFile,
    iter_row_batches,
    plan_tiles,
    scores_of_tiles,
    topk_of_tiles,
)
from dattri.algorithm.score.topk import TopKResult
from dattri.algorithm.store.in_memory import ProjectedGradientStore
from dattri.algorithm.store.memmap_store import batch_plan
from dattri.algorithm.store.scaled import collect_features_scaled
from dattri.algorithm.utils import check_rps_settings, rps_alpha, rps_finetune_theta
from dattri.loss_checks import train_mode_ok
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

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
        **scale: ``cache_dir`` (a resumable on-disk store of the training rows
            ``[f_i, phi_i]`` written by :meth:`cache`, shared by torch.distributed
            ranks), ``store_dtype`` (its storage dtype; default the model's) and
            ``max_memory`` (budget of the scoring buffers, e.g. ``"2GB"``: tile sizes,
            and a temporary store for the rows if needed; the fit itself holds the
            ``(n, d)`` features).
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
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        self._setup(task, None, device, verbose, **scale)
        check_rps_settings(l2_strength, epoch, solver)
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = normalize_preactivate
        self.l2_strength = float(l2_strength)
        self.epoch = epoch
        self.label_key = label_key
        self.solver = solver
        self.loss_func = task.get_target_func(flatten=False)
        with train_mode_ok():  # RPS runs the model in eval mode itself
            task.load_checkpoint(0)
        self.featurizer = LastLayerFeaturizer(task, final_linear_layer_name, self.device, label_key)
        #: fitted ``(C, d [+1])`` weights, one per checkpoint (bias as last column).
        self.theta: list[Tensor] = []
        #: number of samples in the fit.
        self.n_train: int | None = None
        self._store: ProjectedGradientStore | None = None

    # --------------------------------------------------------------- helpers
    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints of the task."""
        return len(self.task.get_checkpoints())

    def _layer(self) -> nn.Linear:
        return self.featurizer.layer()

    def _features(self, f: Tensor) -> Tensor:
        """Feature map of the fit: optional normalisation, ones column for the bias."""
        f = f.to(torch.float64)
        if self.normalize_preactivate:
            f = F.normalize(f, dim=1)
        if self._layer().bias is not None:
            f = torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)
        return f

    def _x_alpha(self, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Features ``x (n, d')`` and representer weights ``alpha (n, C)`` of ``[f, phi]`` rows."""
        f, o = self.featurizer.split(rows)
        x = self._features(f)
        alpha = rps_alpha(
            self.theta[k], self.loss_func, x, o.to(torch.float64), self.l2_strength, self.n_train
        )
        return x, alpha

    # ---------------------------------------------------------------- phases
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Fit the last layer on the training set (one fit per checkpoint).

        The rows ``[f_i, phi_i]`` are kept (in memory, or in the store of
        ``cache_dir``: a second ``cache`` on the same directory resumes an interrupted
        one) and reused when :meth:`attribute` gets this same loader.

        Args:
            full_train_dataloader: the training data of the fit (``n`` samples).
        """
        require_reiterable(full_train_dataloader, "full_train_dataloader", "RPSAttributor")
        check_loader(full_train_dataloader, "full_train_dataloader")
        store = collect_features_scaled(
            self.featurizer,
            full_train_dataloader,
            self.num_checkpoints,
            self.scale_options,
            self,
            kind="RPS last-layer rows",
            verbose=self.verbose,
            desc="RPS features (full_train_dataloader)",
        )
        thetas = []
        for k in range(self.num_checkpoints):
            rows = store.features[k]
            f, o = self.featurizer.split(getattr(rows, "materialize", lambda r=rows: r)())
            with train_mode_ok():
                self.task.load_checkpoint(k)
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
        self._store = store

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if self.theta:
            return
        warnings.warn(
            "RPSAttributor: cache() was not called; fitting the last layer on train_dataloader.",
            UserWarning,
            stacklevel=4,
        )
        self.cache(train_dataloader)

    def _local_rows(self, loader: Iterable, labels: bool) -> tuple[int, list[tuple]]:
        """This rank's share of ``loader``: first row and per checkpoint ``(rows, y)``."""
        pairs = list(iter_row_batches(loader, True))
        batches = [b for _, b, _ in pairs]
        out = []
        for k in range(self.num_checkpoints):
            f, o, y = self.featurizer.rows(batches, k, "train_dataloader", labels)
            out.append((torch.cat([f, o], dim=1), y))
        return (pairs[0][2] if pairs else 0), out

    def _tests(self, test_dataloader: Iterable) -> list[tuple[Tensor, Tensor | None]]:
        """Per checkpoint test features ``(m, d')`` and labels ``(m,)`` (multi-class)."""
        check_loader(test_dataloader, "test_dataloader")
        multi = self.featurizer.num_classes > 1
        tests = []
        for k in range(self.num_checkpoints):
            f_te, _, y_te = self.featurizer.rows(test_dataloader, k, "test_dataloader", multi)
            if multi:
                self._check_labels(y_te, self.featurizer.num_classes)
            tests.append((self._features(f_te), y_te))
        self._out_dtype = f_te.dtype
        return tests

    def _iter_tiles(
        self, train_dataloader: Iterable, tests: list[tuple[Tensor, Tensor | None]]
    ) -> tuple[int, Iterator[tuple[int, int, Tensor]]]:
        """``n_train`` and this rank's ``(row, col, tile)`` of the mean representer values."""
        check_loader(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        n_test, width = tests[0][0].shape
        budget = self.scale_options.max_memory
        reserved = len(tests) * n_test * width * 8 if budget else 0
        store = self._store
        cached = store is not None and store.is_for(train_dataloader)
        if cached:  # the store's rows, this rank's share of its row blocks
            n, sources, offset = store.num_samples, store.features, 0
        else:  # this rank's share of the loader, featurized now
            offset, local = self._local_rows(train_dataloader, False)
            sources = [rows for rows, _ in local]
            n = sum(batch_plan(train_dataloader)) if is_distributed() else len(sources[0])
            store = ProjectedGradientStore(loader=None, features=sources)
        width += self.featurizer.out_dim
        plan = plan_tiles(n, n_test, width, budget, itemsize=8, reserved=reserved)
        store.block_rows = plan.train_block
        row_blocks = store.row_blocks(n_test, shard=cached)
        cols = [
            slice(c, min(c + plan.test_block, n_test)) for c in range(0, n_test, plan.test_block)
        ]
        return n, self._tiles(sources, row_blocks, offset, tests, cols)

    def _tiles(
        self, sources: list, row_blocks: Iterator[slice], offset: int, tests: list, cols: list
    ) -> Iterator[tuple[int, int, Tensor]]:
        for rows in row_blocks:
            parts = [self._x_alpha(src[rows], k) for k, src in enumerate(sources)]
            for c in cols:
                total = None
                for (x, alpha), (xt, yt) in zip(parts, tests):
                    kern = x @ xt[c].T
                    score = kern * (alpha[:, yt[c].long()] if alpha.shape[1] > 1 else alpha)
                    total = score if total is None else total + score
                yield offset + rows.start, c.start, (total / len(sources)).to(self._out_dtype)

    def attribute(
        self, train_dataloader: Iterable, test_dataloader: Iterable, *, out: ScoreFile = None
    ) -> Tensor:
        """Representer values of every (train, test) pair.

        Args:
            train_dataloader: training samples (rows); for the exact decomposition, the
                samples of the fit.
            test_dataloader: test samples (columns); labels pick the class.
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)``: ``alpha_i[y_t] <f_i, f_t>`` (single output:
            ``alpha_i <f_i, f_t>``), mean over checkpoints, in the model's dtype.
        """
        self._ensure_cached(train_dataloader)
        tests = self._tests(test_dataloader)
        n, tiles = self._iter_tiles(train_dataloader, tests)
        return scores_of_tiles(tiles, out, n, tests[0][0].shape[0], self._out_dtype, self.device)

    def attribute_topk(
        self, train_dataloader: Iterable, test_dataloader: Iterable, k: int
    ) -> TopKResult:
        """Per-test top-k helpful/harmful training samples, streamed tile by tile.

        Args:
            train_dataloader: training samples.
            test_dataloader: test samples.
            k: training samples per side.

        Returns:
            A :class:`~dattri.algorithm.score.topk.TopKResult` with ``(n_test, k)`` tensors.
        """
        self._ensure_cached(train_dataloader)
        tests = self._tests(test_dataloader)
        _, tiles = self._iter_tiles(train_dataloader, tests)
        return topk_of_tiles(tiles, k, tests[0][0].shape[0])

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Representer value of each training sample for itself.

        Args:
            train_dataloader: training samples (with labels for multi-class models).

        Returns:
            ``(n_train,)``, equal to ``attribute(train, train).diag()``.
        """
        check_loader(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        multi = self.featurizer.num_classes > 1
        _, local = self._local_rows(train_dataloader, multi)
        total = None
        for k, (rows, y) in enumerate(local):
            if rows.shape[0] == 0:
                break
            x, alpha = self._x_alpha(rows, k)
            if multi:
                self._check_labels(y, alpha.shape[1])
                a = alpha.gather(1, y.long().unsqueeze(1)).squeeze(1)
            else:
                a = alpha[:, 0]
            val = (x * x).sum(dim=1) * a
            total = val if total is None else total + val
        dtype = self._layer().weight.dtype
        if total is None:
            return gather_rows(torch.zeros(0, dtype=dtype, device=self.device))
        return gather_rows((total / self.num_checkpoints).to(local[0][0].dtype))

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
