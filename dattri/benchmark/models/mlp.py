"""Multi-layer perceptron with upstream-style layer names (``fc1..fcN``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from dattri.benchmark.models._specs import dataset_spec

__all__ = ["MLP", "MLPMnist", "create_mlp_model"]


class MLP(nn.Module):
    """Fully connected ReLU network.

    Layers are ``fc1 .. fc{L+1}`` (``L = len(hidden)``) with ``dropout1 ..
    dropoutL`` after each hidden activation, matching upstream ``MLPMnist``
    parameter names. Inputs with more than two dimensions are flattened from
    dim 1.

    Args:
        in_dim: Number of input features.
        hidden: Widths of the hidden layers (may be empty: then it is a linear
            model named ``fc1``).
        n_classes: Number of output logits.
        dropout: Dropout probability after each hidden layer.

    Raises:
        ValueError: If a size is not positive or ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (64,),
        n_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_dim, *hidden, n_classes]
        if any(int(w) < 1 for w in widths):
            msg = f"All layer sizes must be >= 1, got {widths}."
            raise ValueError(msg)
        if not 0.0 <= dropout < 1.0:
            msg = f"`dropout` must be in [0, 1), got {dropout}."
            raise ValueError(msg)
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.n_hidden = len(hidden)
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            self.add_module(f"fc{i + 1}", nn.Linear(int(w_in), int(w_out)))
            if i < self.n_hidden:
                self.add_module(f"dropout{i + 1}", nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Inputs ``(n, in_dim)`` or ``(n, *dims)`` with ``prod(dims) == in_dim``.

        Returns:
            Logits ``(n, n_classes)``.
        """
        if x.dim() > 2:
            x = x.flatten(1)
        for i in range(1, self.n_hidden + 1):
            x = getattr(self, f"dropout{i}")(torch.relu(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.n_hidden + 1}")(x)


class MLPMnist(MLP):
    """Upstream-compatible MNIST MLP: 784-128-64-10 with dropout (109,386 params).

    Args:
        dropout_rate: Dropout probability after each hidden layer.
    """

    def __init__(self, dropout_rate: float = 0.1) -> None:
        super().__init__(784, (128, 64), 10, dropout=dropout_rate)


def create_mlp_model(dataset: str = "mnist", **kwargs: object) -> MLP:
    """Create an MLP sized for a dataset.

    Args:
        dataset: One of ``"mnist"``, ``"digits"``, ``"digits_binary"``,
            ``"cifar10"``, ``"cifar2"``.
        **kwargs: For ``"mnist"``: ``dropout_rate`` (upstream ``MLPMnist``).
            Otherwise any :class:`MLP` argument (``hidden``, ``dropout``, ...).

    Returns:
        The model.

    Raises:
        ValueError: If ``dataset`` is unknown.
    """
    in_dim, n_classes = dataset_spec(dataset)
    if dataset == "mnist" and set(kwargs) <= {"dropout_rate"}:
        return MLPMnist(**kwargs)  # type: ignore[arg-type]
    params = {"in_dim": in_dim, "n_classes": n_classes, **kwargs}
    return MLP(**params)  # type: ignore[arg-type]
