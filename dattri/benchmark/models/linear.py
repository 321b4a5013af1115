"""Multinomial logistic regression (a single linear layer)."""

from __future__ import annotations

import torch
from torch import nn

from dattri.benchmark.models._specs import dataset_spec

__all__ = ["LogisticRegression", "LogisticRegressionMnist", "create_lr_model"]


class LogisticRegression(nn.Module):
    """Linear classifier ``logits = W x + b`` with the layer named ``linear``.

    Inputs with more than two dimensions (e.g. images ``(n, 1, 28, 28)``) are
    flattened from dim 1; ``(n, in_dim)`` and un-batched ``(in_dim,)`` inputs are
    used as they are.

    Args:
        in_dim: Number of input features.
        n_classes: Number of classes (output logits).
        bias: Whether the layer has a bias.

    Raises:
        ValueError: If a size is not positive.
    """

    def __init__(self, in_dim: int, n_classes: int, bias: bool = True) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1:
            msg = f"`in_dim` and `n_classes` must be >= 1, got {in_dim}, {n_classes}."
            raise ValueError(msg)
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.linear = nn.Linear(in_dim, n_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Inputs ``(n, in_dim)``, ``(n, *dims)`` with ``prod(dims) == in_dim``,
                or ``(in_dim,)``.

        Returns:
            Logits ``(n, n_classes)`` (or ``(n_classes,)`` for 1-D input).
        """
        if x.dim() > 2:
            x = x.flatten(1)
        return self.linear(x)


class LogisticRegressionMnist(LogisticRegression):
    """Upstream-compatible MNIST logistic regression (784 -> 10, 7,850 params)."""

    def __init__(self) -> None:
        super().__init__(784, 10)


def create_lr_model(dataset: str = "mnist", **kwargs: object) -> LogisticRegression:
    """Create a logistic-regression model sized for a dataset.

    Args:
        dataset: One of ``"mnist"``, ``"digits"``, ``"digits_binary"``,
            ``"cifar10"``, ``"cifar2"``.
        **kwargs: Override ``in_dim``/``n_classes``/``bias``.

    Returns:
        The model (``LogisticRegressionMnist`` for ``"mnist"`` with no overrides).

    Raises:
        ValueError: If ``dataset`` is unknown.
    """
    in_dim, n_classes = dataset_spec(dataset)
    if dataset == "mnist" and not kwargs:
        return LogisticRegressionMnist()
    params = {"in_dim": in_dim, "n_classes": n_classes, **kwargs}
    return LogisticRegression(**params)  # type: ignore[arg-type]
