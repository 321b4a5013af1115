"""Validation shared by the benchmark models' configuration dataclasses."""

from __future__ import annotations

from collections.abc import Iterable


def check_config(
    config: object,
    *,
    nonnegative: Iterable[str] = (),
    positive: Iterable[str] = (),
    heads_width: tuple[str, str] | None = None,
) -> None:
    """Check the integer fields, the head count and the dropout of a config.

    Args:
        config: A configuration dataclass; its class name starts every message.
        nonnegative: Fields that must be ``>= 0``.
        positive: Fields that must be ``>= 1``.
        heads_width: ``(heads, width)`` field names: ``heads`` must divide
            ``width``, and the config's ``dropout`` must be in ``[0, 1)``.

    Raises:
        ValueError: Naming the first offending field and its value.
    """
    cls = type(config).__name__
    for minimum, names in ((0, nonnegative), (1, positive)):
        for name in names:
            if int(getattr(config, name)) < minimum:
                msg = f"{cls}.{name} must be >= {minimum}, got {getattr(config, name)}."
                raise ValueError(msg)
    if heads_width is None:
        return
    heads, width = heads_width
    n_heads, n_width = getattr(config, heads), getattr(config, width)
    if n_width % n_heads:
        msg = f"{cls}.{heads}={n_heads} must divide {width}={n_width}; change one of them."
        raise ValueError(msg)
    dropout = config.dropout  # type: ignore[attr-defined]
    if not 0.0 <= dropout < 1.0:
        msg = f"{cls}.dropout must be in [0, 1), got {dropout}."
        raise ValueError(msg)
