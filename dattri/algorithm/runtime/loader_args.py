"""The keyword form ``attribute(train=..., test=...)`` shared by every attributor.

Upstream's positional orders differ between methods (``TRAKAttributor.attribute`` takes
the test loader first), so every attributor also accepts the loaders by role:
``train=`` stands for the method's ``train_dataloader`` and ``test=`` for its
``test_dataloader``, whatever their positions. :func:`loader_keywords` wraps one method;
:class:`~dattri.algorithm.base.BaseAttributor` applies it to the public methods of every
subclass, so a method file writes nothing for it.

Example:
    >>> trak.attribute(train=train_loader, test=test_loader)  # == trak.attribute(test, train)
    >>> tracin.attribute_topk(train=train_loader, test=test_loader, k=5)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["LOADER_KEYWORDS", "WRAPPED_METHODS", "loader_keywords"]

#: The role keywords and the upstream parameter each one stands for.
LOADER_KEYWORDS = {"train": "train_dataloader", "test": "test_dataloader"}

#: The public methods that take loaders (wrapped on every ``BaseAttributor`` subclass).
WRAPPED_METHODS = ("attribute", "attribute_topk", "self_attribute", "attribute_train_test")

_ROLE = {"train": "training", "test": "test"}

F = TypeVar("F", bound=Callable[..., Any])


def loader_keywords(method: F | None = None, *, hint: str = "") -> F | Callable[[F], F]:
    """Let ``method`` take its loaders as ``train=`` / ``test=`` as well.

    The wrapped method keeps its own signature and positional order; ``train=x``
    becomes ``train_dataloader=x`` and ``test=x`` becomes ``test_dataloader=x``. A call
    without those keywords goes straight through. Applying it twice is harmless.

    Args:
        method: an attributor method whose parameters (after ``self``) include
            ``train_dataloader`` and/or ``test_dataloader``. Without it, a decorator
            is returned (``@loader_keywords(hint=...)``).
        hint: appended to the error for a role the method has no loader for (e.g.
            how that method selects its training samples instead).

    Returns:
        The wrapped method; its ``inspect.signature`` is the original one plus the
        keyword-only ``train`` / ``test`` it accepts.
    """
    if method is None:
        return functools.partial(loader_keywords, hint=hint)
    if getattr(method, "_loader_keywords", False):
        return method
    sig = inspect.signature(method)
    params = list(sig.parameters.values())
    positional = [
        p.name for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    # A method with its own parameter called ``train``/``test`` keeps it.
    aliases = {
        kw: name
        for kw, name in LOADER_KEYWORDS.items()
        if name in sig.parameters and kw not in sig.parameters
    }
    if not aliases:
        return method
    missing = tuple(kw for kw in LOADER_KEYWORDS if kw not in aliases and kw not in sig.parameters)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if any(kw in kwargs for kw in LOADER_KEYWORDS):
            where = f"{type(self).__name__}.{method.__name__}()"
            kwargs = _resolve(where, positional, aliases, missing, hint, args, kwargs)
        return method(self, *args, **kwargs)

    extra = [inspect.Parameter(kw, inspect.Parameter.KEYWORD_ONLY, default=None) for kw in aliases]
    tail = [p for p in params if p.kind == p.VAR_KEYWORD]
    head = [p for p in params if p.kind != p.VAR_KEYWORD]
    wrapper.__signature__ = sig.replace(parameters=head + extra + tail)
    wrapper._loader_keywords = True
    return wrapper  # type: ignore[return-value]


def _resolve(
    where: str,
    positional: list[str],
    aliases: dict[str, str],
    missing: tuple[str, ...],
    hint: str,
    args: tuple,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Rename ``train=`` / ``test=`` to the method's parameters, refusing duplicates."""
    for kw in missing:
        if kw in kwargs:
            msg = (
                f"{where} takes no {_ROLE[kw]} loader, so it has no '{kw}=' keyword "
                f"(its parameters: {', '.join(positional)}).{' ' + hint if hint else ''}"
            )
            raise TypeError(msg)
    kwargs = dict(kwargs)
    for kw, name in aliases.items():
        if kw not in kwargs:
            continue
        if name in kwargs:
            how = "by keyword"
        elif name in positional[: len(args)]:
            how = f"positionally (argument {positional.index(name) + 1})"
        else:
            kwargs[name] = kwargs.pop(kw)
            continue
        msg = (
            f"{where} got the {_ROLE[kw]} loader twice: {how} as '{name}' and as '{kw}='. "
            f"Pass it once: either in upstream's order ({', '.join(positional[:2])}, ...) "
            f"or by role ('{kw}=')."
        )
        raise TypeError(msg)
    return kwargs
