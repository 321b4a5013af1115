"""Monte-Carlo dropout: turn dropout layers on in an otherwise evaluating model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["activate_dropout"]


def _is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__.startswith(
        "Dropout"
    )


def activate_dropout(
    model: nn.Module,
    layer_positions: Sequence[str] | str | None = None,
    dropout_prob: float = 0.1,
) -> nn.Module:
    """Put ``model`` in eval mode, then activate (train mode) chosen dropout layers.

    Args:
        model: The model; modified in place.
        layer_positions: ``None`` activates every dropout module; otherwise the
            modules whose qualified name *contains* one of these strings (a
            single string is accepted). Every matched module must be a dropout
            layer and every string must match at least one module.
        dropout_prob: Dropout probability set on the activated layers, in ``[0, 1)``.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: If ``dropout_prob`` is out of range, a matched module is not a
            dropout layer, or a position matches nothing.
    """
    if not 0.0 <= float(dropout_prob) < 1.0:
        msg = f"`dropout_prob` must be in [0, 1); got {dropout_prob}."
        raise ValueError(msg)
    if isinstance(layer_positions, str):
        layer_positions = [layer_positions]
    model.eval()
    unmatched = set(layer_positions or [])
    for name, module in model.named_modules():
        if layer_positions is None:
            selected = _is_dropout(module)
        else:
            hits = {pos for pos in layer_positions if pos in name}
            unmatched -= hits
            selected = bool(hits) and name != ""
            if selected and not _is_dropout(module):
                msg = (
                    f"Module {name!r} ({type(module).__name__}) matches `layer_positions` "
                    "but is not a dropout layer; give more specific names."
                )
                raise ValueError(msg)
        if selected:
            module.train()
            module.p = float(dropout_prob)
    if unmatched:
        msg = f"`layer_positions` {sorted(unmatched)} match no module of the model."
        raise ValueError(msg)
    return model
