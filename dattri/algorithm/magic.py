r"""MAGIC: exact metagradients of the test loss w.r.t. training-sample weights.

Ilyas & Engstrom et al., "MAGIC: Near-Optimal Data Attribution for Deep Learning"
(arXiv 2504.16430). With the training run held fixed (initialisation, batch order,
optimizer and learning-rate schedule), the trained parameters are a deterministic,
differentiable function ``theta_T(w)`` of per-sample training-loss weights ``w``
(``w = 1`` is the actual run; ``w_i = 0`` removes sample ``i``). The score is

.. math::

    S_{ij} = -\frac{\partial f(z_j; \theta_T(w))}{\partial w_i}\Big|_{w = 1}

(larger = up-weighting ``z_i`` lowers the test target more, i.e. removing it would
raise the test loss: the library's sign convention). ``f`` is ``task.target_func`` on
the single test sample seen as a batch of one (the influence-function convention).

The training run is the one of
:func:`dattri.model_util.subset_train.train_subset_models` for the mask of all ones:
model from ``model_factory()`` after ``torch.manual_seed(init_seed)``, the shared batch
order of ``train_config.seed``, the weighted batch loss
:func:`~dattri.model_util.train_step.weighted_mean_loss` and the update
:func:`~dattri.model_util.train_step.optimizer_update` (SGD with momentum and weight
decay, or Adam; learning-rate schedule). Replay and ground-truth retraining share that
code, so MAGIC differentiates exactly the function the fixed-seed LDS ground truth
samples.

Reverse mode (one pass per block of test samples): with the adjoint
``(theta_bar, state_bar)`` of the state after step ``t``, the step
``(theta, state) -> U(theta, state, g(theta, w), lr_t)`` is differentiated with

* ``vjp`` of the element-wise optimizer update ``U`` (gives ``theta_bar`` direct part,
  ``state_bar`` and ``g_bar``),
* ``vjp`` of ``(theta, w_B) -> grad_theta L_B(theta, w_B)`` (linearised once per step,
  reverse-over-reverse) with cotangent ``g_bar``: gives ``H_B g_bar`` (added to
  ``theta_bar``) and ``d(g_bar . grad L_B)/d w_B`` (accumulated into the weights'
  gradient; with ``L_B = sum_i w_i l_i / sum_i w_i`` this is
  ``(g_bar . grad l_i - g_bar . grad L_B) / sum_i w_i``),

both vectorised over the ``k`` test samples of the block with ``vmap`` (one
linearisation, ``k`` double-backward products: cost about ``k`` Hessian-vector products
per step).

States along the trajectory are recomputed from checkpoints: by default
``~sqrt(T)`` kept checkpoints and segments of ``~sqrt(T)`` recomputed states (memory
``O(sqrt(T))`` states, one extra forward pass per test block); with ``max_memory``
(bytes) the schedule recurses (fewer states, more recomputation; down to 2 states and
quadratic recomputation).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from tqdm.auto import tqdm

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.runtime.batching import gather_fields
from dattri.algorithm.runtime.distributed import rank_world, shard_range
from dattri.algorithm.runtime.validation import check_task
from dattri.algorithm.score.tiles import ScoreFile, make_sink, parse_memory
from dattri.model_util.subset_train import (
    SubsetTrainConfig,
    _batches,
    _loss_fn,
    _make_model,
    _to_device,
    train_step,
)
from dattri.model_util.train_step import (
    init_optimizer_state,
    lr_at,
    optimizer_update,
    weighted_mean_loss,
)
from dattri.task import AttributionTask

__all__ = ["MAGICAttributor"]

_MANIFEST = "magic_manifest.json"
State = tuple[list[Tensor], list[Tensor]]  # (params, optimizer state)


def _fingerprint(*tensors: Tensor, extra: Any = None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().cpu().contiguous()
        h.update(str((tuple(arr.shape), str(arr.dtype))).encode())
        h.update(arr.view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class MAGICAttributor(BaseAttributor):
    """Exact metagradient attribution through a fixed training run (MAGIC).

    Args:
        task: the attribution task; its ``target_func(params, data)`` is the test
            function (data = one test sample as a batch of one), its model's trainable
            parameter names must match ``model_factory()``'s.
        model_factory: zero-argument callable building the (untrained) model, as for
            :func:`~dattri.model_util.subset_train.train_subset_models`.
        train_config: the training recipe (optimizer, learning-rate schedule, epochs,
            batch size, seed of the batch order, loss, device, dtype).
        init_seed: seed of the initialisation (default ``train_config.seed``, the seed of
            model 0 in ``train_subset_models``).
        max_memory: bytes (or e.g. ``"2GB"``) for the saved training states plus one
            test block's adjoints (``None``: ``~2 sqrt(T)`` states). Smaller budgets recompute more.
        test_block_size: test samples per reverse pass (vectorised with ``vmap``).
        cache_dir: optional directory: the replayed checkpoints and every finished test
            block's scores are saved there, and a later run with the same settings
            resumes from them.
        check_checkpoint: warn if the task's checkpoint differs from the replayed
            final parameters (relative difference above ``1e-4`` in float64, ``1e-2``
            otherwise).
        verbose: show progress bars.
    """

    def __init__(
        self,
        task: AttributionTask,
        model_factory: Callable[[], nn.Module],
        train_config: SubsetTrainConfig,
        init_seed: int | None = None,
        *,
        max_memory: int | str | None = None,
        test_block_size: int = 32,
        cache_dir: str | Path | None = None,
        check_checkpoint: bool = True,
        verbose: bool = True,
    ) -> None:
        check_task(task)
        if not isinstance(train_config, SubsetTrainConfig):
            msg = (
                "train_config must be a dattri.model_util.SubsetTrainConfig, got "
                f"{type(train_config).__name__}."
            )
            raise TypeError(msg)
        if not callable(model_factory):
            msg = "model_factory must be a zero-argument callable returning the model."
            raise TypeError(msg)
        if isinstance(test_block_size, bool) or int(test_block_size) < 1:
            msg = f"test_block_size must be a positive integer, got {test_block_size!r}."
            raise ValueError(msg)
        self.task = task
        self.model_factory = model_factory
        self.config = train_config
        self.init_seed = int(train_config.seed if init_seed is None else init_seed)
        self.max_memory = parse_memory(max_memory)
        self.test_block_size = int(test_block_size)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.check_checkpoint = check_checkpoint
        self.verbose = verbose
        self._cached = False
        #: most bytes of saved states plus adjoints held during the last ``attribute``.
        self.peak_memory: int = 0
        #: most training states held at once during the last ``attribute``.
        self.peak_states: int = 0
        #: forward (replay) steps and reverse steps of the last ``attribute``.
        self.forward_steps: int = 0
        self.reverse_steps: int = 0

    # ------------------------------------------------------------------ training
    def _setup(self, x: Tensor, y: Tensor) -> None:
        cfg = self.config
        self._x, self._y = _to_device(x, y, cfg)
        self._n = int(x.shape[0])
        self._model = _make_model(self.model_factory, self.init_seed, cfg)
        named = {n: p for n, p in self._model.named_parameters() if p.requires_grad}
        self._names = list(named)
        if set(self._names) != set(self.task.param_names):
            msg = (
                "model_factory() and task.model have different trainable parameters: "
                f"{sorted(self._names)} vs {sorted(self.task.param_names)}. Pass the "
                "factory that built the task's model."
            )
            raise ValueError(msg)
        self._init_params = [p.detach().clone() for p in named.values()]
        self._loss = _loss_fn(cfg.loss)
        self._steps = [b.to(cfg.device) for epoch in _batches(self._n, cfg) for b in epoch]
        self._T = len(self._steps)
        self._weights = torch.ones(self._n, dtype=cfg.dtype, device=cfg.device)
        init = (self._init_params, init_optimizer_state(self._init_params, cfg))
        self._state_bytes = sum(t.numel() * t.element_size() for t in init[0] + init[1])

    def _batch_loss(self, params: list[Tensor], t: int, wb: Tensor) -> tuple[Tensor, Tensor]:
        """Weighted loss of step ``t``'s batch (weights ``wb`` ``(B,)``), per-sample losses."""
        idx = self._steps[t]
        named = dict(zip(self._names, params, strict=True))
        per = self._loss(functional_call(self._model, named, (self._x[idx],)), self._y[idx])
        return weighted_mean_loss(per, wb), per

    def _step(self, state: State, t: int) -> State:
        """Training step ``t`` (the shared :func:`train_step`)."""
        self.forward_steps += 1
        return train_step(
            lambda ps: self._batch_loss(ps, t, self._weights[self._steps[t]])[0],
            state[0],
            state[1],
            t,
            self._T,
            self.config,
        )

    # ------------------------------------------------------------------ memory plan
    def _budget_states(self, block: int) -> int:
        """Training states the schedule may hold (incl. one transient)."""
        if self.max_memory is None:
            c = math.ceil(math.sqrt(self._T))
            return c + math.ceil(self._T / c) + 1
        adjoint = 3 * block * self._state_bytes
        states = (int(self.max_memory) - adjoint) // self._state_bytes
        if states < 3:
            need = adjoint + 3 * self._state_bytes
            msg = (
                f"max_memory={self.max_memory} bytes is too small: one training state takes "
                f"{self._state_bytes} bytes and a test block of {block} adjoints "
                f"{adjoint}; the minimum is {need} bytes. Raise max_memory or lower "
                "test_block_size."
            )
            raise ValueError(msg)
        return int(states)

    @staticmethod
    def _split(n: int, budget: int) -> int:
        """Number of chunks for ``n`` steps under ``budget`` held states."""
        for c in range(1, budget):
            if math.ceil(n / c) <= budget - c + 1:
                return c
        return max(2, (budget + 1) // 2)

    def _hold(self, delta: int) -> None:
        self._held += delta
        self.peak_states = max(self.peak_states, self._held)

    # ------------------------------------------------------------------ cache
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Replay the training run and keep the top-level checkpoints.

        Args:
            full_train_dataloader: the training data in training order (row ``i`` =
                sample ``i`` of the run; not shuffled), ``(inputs, targets)`` batches
                or one ``(inputs, targets)`` tensor pair.
        """
        x, y = gather_fields(full_train_dataloader, "full_train_dataloader")[:2]
        self._setup(x, y)
        self._key = _fingerprint(
            x,
            y,
            extra={
                "config": self.config.to_dict(),
                "init_seed": self.init_seed,
                "factory": getattr(self.model_factory, "__qualname__", str(self.model_factory)),
            },
        )
        budget = self._budget_states(self.test_block_size)
        # top-level checkpoints and the final state are held through every block; a
        # chunk's recursion gets the rest (its own start counted in both)
        self._chunks = self._split(self._T, budget - 2)
        if budget - self._chunks < 2:
            self._chunks = 1
        self._chunk_budget = budget - self._chunks
        bounds = [round(j * self._T / self._chunks) for j in range(self._chunks + 1)]
        self._bounds = [(bounds[j], bounds[j + 1]) for j in range(self._chunks)]
        if not self._load_checkpoints():
            init = (self._init_params, init_optimizer_state(self._init_params, self.config))
            self._ckpts: list[State] = []
            state = init
            starts = {a for a, _ in self._bounds}
            for t in tqdm(range(self._T), desc="MAGIC replay", disable=not self.verbose):
                if t in starts:
                    self._ckpts.append(state)
                state = self._step(state, t)
            self._final = state
            self._save_checkpoints()
        self._cached = True
        if self.check_checkpoint:
            self._compare_task_checkpoint()

    def _compare_task_checkpoint(self) -> None:
        params = self.task.get_param_dict(0)
        diff = sum(
            float((params[n].to(p) - p).norm() ** 2)
            for n, p in zip(self._names, self._final[0], strict=True)
        )
        norm = sum(float(p.norm() ** 2) for p in self._final[0])
        tol = 1e-8 if self.config.dtype == torch.float64 else 1e-4
        if diff > tol * max(norm, 1e-30):
            warnings.warn(
                "MAGICAttributor: the task's checkpoint differs from the replayed training "
                f"run's final parameters (relative difference {math.sqrt(diff / norm):.2e}); "
                "the scores describe the replayed run (same factory, init_seed and "
                "train_config as the model's training?).",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ resume
    def _manifest(self) -> dict[str, Any]:
        return {"key": self._key, "bounds": self._bounds, "T": self._T}

    def _load_checkpoints(self) -> bool:
        if self.cache_dir is None:
            return False
        path = self.cache_dir / _MANIFEST
        if not path.exists():
            return False
        old = json.loads(path.read_text())
        if old.get("key") != self._key:
            msg = (
                f"cache_dir {str(self.cache_dir)!r} holds a MAGIC cache of a different run "
                "(training data, train_config, init_seed or factory differ). Use another "
                "cache_dir or delete this one."
            )
            raise ValueError(msg)
        if old.get("bounds") != [list(b) for b in self._bounds]:
            return False  # another memory plan: replay again
        data = torch.load(self.cache_dir / "checkpoints.pt", weights_only=True)
        dev = self.config.device
        self._ckpts = [([t.to(dev) for t in p], [t.to(dev) for t in s]) for p, s in data["ckpts"]]
        self._final = tuple([t.to(dev) for t in part] for part in data["final"])
        return True

    def _save_checkpoints(self) -> None:
        if self.cache_dir is None or rank_world()[0] != 0:  # ranks replay the same run
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cpu = [([t.cpu() for t in p], [t.cpu() for t in s]) for p, s in self._ckpts]
        final = [[t.cpu() for t in part] for part in self._final]
        tmp = self.cache_dir / "checkpoints.pt.tmp"
        torch.save({"ckpts": cpu, "final": final}, tmp)
        tmp.replace(self.cache_dir / "checkpoints.pt")
        (self.cache_dir / _MANIFEST).write_text(json.dumps(self._manifest()))

    # ------------------------------------------------------------------ reverse
    def _test_loss(self, params: list[Tensor], *fields: Tensor) -> Tensor:
        data = tuple(f.unsqueeze(0) for f in fields)
        return self.task.original_target_func(dict(zip(self._names, params, strict=True)), data)

    def _reverse_step(self, t: int, state: State, adj: State, w_bar: Tensor) -> State:
        """Pull the adjoint of the state after step ``t`` back to before it."""
        self.reverse_steps += 1
        params, opt = state
        idx = self._steps[t]
        lr = lr_at(self.config, t, self._T)
        if adj[0][0].shape[0] == 1:  # one cotangent: plain autograd, no vmap overhead
            return self._reverse_step_single(t, state, adj, w_bar, lr)

        def grad_of(ps: list[Tensor], wb: Tensor) -> list[Tensor]:
            return grad(lambda q: self._batch_loss(q, t, wb)[0])(ps)

        # one linearisation of (theta, w_B) -> grad L_B, reused by all k cotangents
        g, pull_grad = vjp(grad_of, params, self._weights[idx])

        def update(ps: list[Tensor], st: list[Tensor], gs: list[Tensor]) -> tuple:
            return tuple(optimizer_update(ps, st, gs, t, lr, self.config))

        _, pull = vjp(update, params, opt, g)
        p_dir, opt_bar, g_bar = vmap(pull)(tuple(adj))
        hg, wg = vmap(pull_grad)(g_bar)  # H_B g_bar (k, ...) each; d(g_bar . g)/dw_B (k, B)
        w_bar.index_add_(0, idx, wg.T)
        return [a + b for a, b in zip(p_dir, hg, strict=True)], list(opt_bar)

    def _reverse_step_single(
        self, t: int, state: State, adj: State, w_bar: Tensor, lr: float
    ) -> State:
        """:meth:`_reverse_step` for one cotangent: one backward through the update.

        Same products as the vectorised path (the update's VJP, ``H_B g_bar`` and the
        batch weights' gradient), through ``torch.autograd`` with a double-backward
        graph instead of ``vmap`` over ``torch.func`` pullbacks (about 1.7x faster for
        a single test sample on the digits MLP).
        """
        idx = self._steps[t]
        with torch.enable_grad():
            ps = [p.detach().requires_grad_() for p in state[0]]
            st = [s.detach().requires_grad_() for s in state[1]]
            wb = self._weights[idx].detach().requires_grad_()
            g = torch.autograd.grad(self._batch_loss(ps, t, wb)[0], ps, create_graph=True)
            new_p, new_s = optimizer_update(ps, st, list(g), t, lr, self.config)
            outs = [*new_p, *new_s]
            cots = [c[0] for c in (*adj[0], *adj[1])]
            used = [i for i, o in enumerate(outs) if o.requires_grad]
            inputs = [*ps, *st, wb]
            res = torch.autograd.grad(
                [outs[i] for i in used],
                inputs,
                [cots[i] for i in used],
                allow_unused=True,
                materialize_grads=True,
            )
        n = len(ps)
        w_bar.index_add_(0, idx, res[-1].detach()[:, None])
        return [r.detach()[None] for r in res[:n]], [r.detach()[None] for r in res[n:-1]]

    def _reverse(self, a: int, b: int, start: State, budget: int, visit: Callable) -> None:
        """Call ``visit(t, state_t)`` for ``t = b-1, ..., a`` holding <= ``budget`` states."""
        n = b - a
        if n <= budget - 1:  # leaf: store the segment (plus one transient)
            states = [start]
            self._hold(n)  # segment states beyond start, plus the transient
            for t in range(a, b - 1):
                states.append(self._step(states[-1], t))
            for t in range(b - 1, a - 1, -1):
                visit(t, states.pop())
            self._hold(-n)
            return
        if budget <= 3:  # hold start and a running state: quadratic recomputation
            self._hold(1)
            for t in range(b - 1, a - 1, -1):
                state = start
                for s in range(a, t):
                    state = self._step(state, s)
                visit(t, state)
            self._hold(-1)
            return
        c = self._split(n, budget - 1)
        bounds = [a + round(j * n / c) for j in range(c + 1)]
        starts = [start]
        self._hold(c)  # c - 1 further chunk starts plus one transient
        state = start
        for t in range(a, bounds[c - 1]):
            state = self._step(state, t)
            if t + 1 in bounds[1:c]:
                starts.append(state)
        self._hold(-1)
        for j in range(c - 1, -1, -1):
            self._reverse(bounds[j], bounds[j + 1], starts.pop(), budget - j, visit)
            if j:
                self._hold(-1)

    def _scores_block(self, fields: tuple[Tensor, ...], bar: tqdm) -> Tensor:
        k = int(fields[0].shape[0])
        final_params = self._final[0]
        adj_p = vmap(grad(self._test_loss), in_dims=(None, *([0] * len(fields))))(
            final_params, *fields
        )
        zeros = [torch.zeros(k, *s.shape, dtype=s.dtype, device=s.device) for s in self._final[1]]
        adj = [list(adj_p), zeros]
        w_bar = torch.zeros(self._n, k, dtype=self.config.dtype, device=self.config.device)
        self._held = len(self._ckpts) + 1  # checkpoints + the final state
        self.peak_states = max(self.peak_states, self._held)

        def visit(t: int, state: State) -> None:
            adj[:] = self._reverse_step(t, state, adj, w_bar)
            bar.update(1)

        for j in range(self._chunks - 1, -1, -1):
            a, b = self._bounds[j]
            self._reverse(a, b, self._ckpts[j], self._chunk_budget, visit)
        adj_bytes = 3 * k * self._state_bytes
        self.peak_memory = max(self.peak_memory, self.peak_states * self._state_bytes + adj_bytes)
        return -w_bar

    def attribute(
        self, train_dataloader: Iterable, test_dataloader: Iterable, *, out: ScoreFile = None
    ) -> Tensor:
        """``(n_train, n_test)`` scores ``-d target(z_j) / d w_i`` at ``w = 1``.

        Test blocks are reverse passes of their own: under torch.distributed each rank
        runs its contiguous share of them (every rank returns the whole matrix).

        Args:
            train_dataloader: the training data of :meth:`cache` (same samples, same
                order).
            test_dataloader: test samples ``(inputs, targets)`` (columns).
            out: path of a ``.npy`` score file: each finished test block is written there
                and a memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)`` scores (larger = more helpful), in
            ``train_config.dtype`` on CPU.

        Raises:
            ValueError: before :meth:`cache`, or when ``train_dataloader`` is not the
                cached training data.
        """
        if not self._cached:
            msg = "MAGICAttributor: call cache(full_train_dataloader) before attribute()."
            raise ValueError(msg)
        x, y = gather_fields(train_dataloader, "train_dataloader")[:2]
        xx, yy = _to_device(x, y, self.config)
        if xx.shape != self._x.shape or not (torch.equal(xx, self._x) and torch.equal(yy, self._y)):
            msg = (
                "train_dataloader must yield the training data of cache() in the same order "
                f"(cached {self._n} samples, got {x.shape[0]}); MAGIC differentiates that run."
            )
            raise ValueError(msg)
        test = gather_fields(test_dataloader, "test_dataloader")
        test = tuple(
            t.to(self.config.device, self.config.dtype if t.is_floating_point() else t.dtype)
            for t in test
        )
        n_test = int(test[0].shape[0])
        self.peak_memory = self.peak_states = self.forward_steps = self.reverse_steps = 0
        starts = range(0, n_test, self.test_block_size)
        mine = shard_range(len(starts))
        sink = make_sink(out, self._n, n_test, self.config.dtype, "cpu")
        with tqdm(total=len(mine) * self._T, desc="MAGIC reverse", disable=not self.verbose) as bar:
            for s in starts[mine.start : mine.stop]:
                fields = tuple(f[s : s + self.test_block_size] for f in test)
                sink.add(0, s, self._block_with_resume(fields, bar).cpu())
        return sink.finalize()

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """``(n_train,)`` self-influence ``-d loss_i(theta_T(w)) / d w_i`` at ``w = 1``.

        Every training sample is a test function here (its target through
        ``task.target_func``), so this costs ``n_train / test_block_size`` reverse passes.

        Args:
            train_dataloader: the training data of :meth:`cache` (same order).

        Returns:
            ``(n_train,)`` scores.
        """
        fields = gather_fields(train_dataloader, "train_dataloader")
        out = []
        for s in range(0, self._n if self._cached else 0, self.test_block_size):
            block = tuple(f[s : s + self.test_block_size] for f in fields)
            scores = self.attribute(train_dataloader, block)
            out.append(scores[s : s + scores.shape[1]].diagonal())
        if not self._cached:
            msg = "MAGICAttributor: call cache(full_train_dataloader) before self_attribute()."
            raise ValueError(msg)
        return torch.cat(out)

    def secant_check(
        self,
        test_data: Iterable,
        train_indices: Iterable[int],
        deltas: Iterable[float] = (1e-3, 0.1, 1.0),
    ) -> dict[str, Tensor]:
        """How well the metagradient predicts retraining: secants ``(F(1 - d e_i) - F(1)) / d``.

        ``F`` = the test targets after the replayed run, ``e_i`` = sample ``i``'s weight.
        The scores are exact derivatives; on a run that is not smooth in the weights
        (large steps at the edge of stability, ReLU kinks) the secants drift from them
        already at small ``d`` and a linear prediction of removal (``d = 1``) is poor.
        Costs one replay of the training run per ``(i, d)``.

        Args:
            test_data: test samples ``(inputs, targets)`` (a few suffice).
            train_indices: training samples ``i`` to perturb.
            deltas: weight decrements ``d`` in ``(0, 1]``.

        Returns:
            ``scores`` ``(m, n_test)``, ``secants`` ``(len(deltas), m, n_test)`` and
            ``relative_error`` ``(len(deltas),)`` = ``||secants - scores|| / ||scores||``.
        """
        if not self._cached:
            msg = "MAGICAttributor: call cache(full_train_dataloader) before secant_check()."
            raise ValueError(msg)
        idx, ds = [int(i) for i in train_indices], [float(d) for d in deltas]
        if not all(0 < d <= 1 for d in ds) or not all(0 <= i < self._n for i in idx):
            msg = f"deltas must lie in (0, 1] and train_indices in [0, {self._n}); got {ds}, {idx}."
            raise ValueError(msg)
        test = [t.to(self.config.device) for t in gather_fields(test_data, "test_data")]
        test = [t.to(self.config.dtype) if t.is_floating_point() else t for t in test]
        scores = self.attribute((self._x, self._y), tuple(test))[idx].to(self.config.dtype)

        def targets(w: Tensor) -> Tensor:
            self._weights = w
            state = (self._init_params, init_optimizer_state(self._init_params, self.config))
            for t in range(self._T):
                state = self._step(state, t)
            return torch.stack([self._test_loss(state[0], *f) for f in zip(*test, strict=True)])

        ones = torch.ones_like(self._weights)
        try:
            base = targets(ones)
            sec = torch.zeros(len(ds), len(idx), scores.shape[1], dtype=scores.dtype)
            for a, d in enumerate(ds):
                for b, i in enumerate(idx):
                    w = ones.clone()
                    w[i] -= d
                    sec[a, b] = ((targets(w) - base) / d).detach().cpu()
        finally:
            self._weights = ones
        err = (sec - scores).flatten(1).norm(dim=1) / scores.norm().clamp_min(1e-30)
        return {"scores": scores, "secants": sec, "relative_error": err}

    def _block_with_resume(self, fields: tuple[Tensor, ...], bar: tqdm) -> Tensor:
        if self.cache_dir is None:
            return self._scores_block(fields, bar)
        name = f"scores_{_fingerprint(*fields, extra=self._key)}.pt"
        path = self.cache_dir / name
        if path.exists():
            bar.update(self._T)
            return torch.load(path, weights_only=True).to(self.config.device)
        scores = self._scores_block(fields, bar)
        tmp = path.with_suffix(".tmp")
        torch.save(scores.cpu(), tmp)
        tmp.replace(path)
        return scores
