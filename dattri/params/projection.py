"""Projection parameter classes shared by attributors (upstream-compatible).

Plain dataclasses (no pydantic): keyword-only construction, values validated in
``__post_init__``, ``model_dump()`` returns a dict of the fields. Unknown
keyword arguments are accepted (as upstream, which ignores them) but trigger a
``UserWarning`` naming them.

Typical use::

    params = TRAKProjectionParams(proj_dim=1024)
    random_params = RandomProjectionParams(
        feature_batch_size=32, device="cpu", **params.model_dump()
    )
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from dattri.func.projection_engine import ProjectionType, check_int, parse_proj_type

PROJ_TYPES = tuple(t.value for t in ProjectionType)
"""Valid ``proj_type`` values (``"grass_N"`` with ``N >= 1`` is also accepted)."""

_T = TypeVar("_T")


class ProjectionParamsError(TypeError, ValueError):
    """Invalid or missing projection parameter.

    A ``TypeError`` (ours) that is also a ``ValueError``, like the pydantic
    ``ValidationError`` upstream dattri raises for the same inputs.
    """


def _params_dataclass(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a keyword-only dataclass that warns about unknown kwargs.

    Args:
        cls: Class to decorate.

    Returns:
        The decorated class.
    """
    cls = dataclasses.dataclass(kw_only=True)(cls)
    generated_init: Callable[..., None] = cls.__init__
    names = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(generated_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            msg = f"{cls.__name__} takes keyword arguments only."
            raise TypeError(msg)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            warnings.warn(
                f"{cls.__name__} ignores unknown argument(s): {', '.join(unknown)}.",
                UserWarning,
                stacklevel=2,
            )
        try:
            generated_init(self, **{k: v for k, v in kwargs.items() if k in names})
        except TypeError as exc:  # missing required field or wrong type
            if isinstance(exc, ProjectionParamsError):
                raise
            raise ProjectionParamsError(str(exc)) from exc

    cls.__init__ = __init__
    return cls


def _check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """Validate an integer field (:func:`dattri.func.projection_engine.check_int`).

    Args:
        value: Field value.
        name: Field name (for the message).
        minimum: Smallest allowed value, if any.

    Returns:
        The value as a Python int.
    """
    expected = "an int" if minimum is None else f"an int >= {minimum}"
    return check_int(value, name, minimum=minimum, expected=expected)


def _check_proj_type(value: object) -> str:
    """Validate ``proj_type`` and return its string value.

    Args:
        value: A string (or ``ProjectionType``) naming a projection type.

    Returns:
        The type name as a plain ``str`` (``"grass_N"`` kept as given).

    Raises:
        TypeError: If ``value`` is not a string.
        ValueError: If ``value`` names no supported type (see
            :func:`dattri.func.projection_engine.parse_proj_type`).
    """
    parse_proj_type(value)
    return str(getattr(value, "value", value))


@_params_dataclass
class BaseProjectionParams:
    """Settings common to all projections.

    Attributes:
        proj_max_batch_size: Maximum rows projected at once.
        proj_seed: Random seed of the projection.
        proj_type: One of ``identity, normal, rademacher, sjlt, random_mask,
            grass`` or ``"grass_N"``.
    """

    proj_max_batch_size: int = 64
    proj_seed: int = 0
    proj_type: str = "normal"

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            TypeError: For wrongly typed fields.
            ValueError: For invalid values.
        """
        for f in dataclasses.fields(self):
            validator = _VALIDATORS.get(f.name)
            if validator is not None:
                setattr(self, f.name, validator(getattr(self, f.name), f.name))

    def model_dump(
        self,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Return the fields as a dict (like pydantic's ``model_dump``).

        Args:
            include: If given, only these fields.
            exclude: Fields to leave out.

        Returns:
            ``{field_name: value}`` in declaration order.
        """
        keep = None if include is None else set(include)
        drop = set() if exclude is None else set(exclude)
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if (keep is None or f.name in keep) and f.name not in drop
        }


def _positive(value: object, name: str) -> int:
    return _check_int(value, name, minimum=1)


def _optional_positive(value: object, name: str) -> int | None:
    return None if value is None else _check_int(value, name, minimum=1)


def _seed(value: object, name: str) -> int:
    return _check_int(value, name)


def _proj_type(value: object, name: str) -> str:
    del name
    return _check_proj_type(value)


def _device(value: object, name: str) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        msg = f"{name} must be a str or torch.device, got {type(value).__name__}."
        raise TypeError(msg)
    try:
        return torch.device(value)
    except RuntimeError as err:
        msg = f"{name}={value!r} is not a valid torch device string."
        raise ValueError(msg) from err


_VALIDATORS: dict[str, Callable[[object, str], Any]] = {
    "proj_max_batch_size": _positive,
    "proj_seed": _seed,
    "proj_type": _proj_type,
    "proj_dim": _positive,
    "proj_dim_per_layer": _optional_positive,
    "feature_batch_size": _positive,
    "device": _device,
}


@_params_dataclass
class GeneralProjectionParams(BaseProjectionParams):
    """Projection to a fixed dimension.

    Attributes:
        proj_dim: Output dimension (required).
    """

    proj_dim: int


@_params_dataclass
class LoGraProjectionParams(BaseProjectionParams):
    """LoGra per-layer projection.

    Attributes:
        proj_dim_per_layer: Projected dimension of each layer (default 4096).
    """

    proj_dim_per_layer: int = 4096


@_params_dataclass
class FactGrassProjectionParams(BaseProjectionParams):
    """FactGraSS per-layer projection.

    Attributes:
        proj_dim_per_layer: Projected dimension of each layer (default 4096).
    """

    proj_dim_per_layer: int = 4096


FactGraSSProjectionParams = FactGrassProjectionParams
"""Alias with the spelling used in the upstream documentation."""


@_params_dataclass
class TracInProjectionParams(BaseProjectionParams):
    """TracIn projection (defaults: ``proj_dim=512``, ``proj_max_batch_size=32``).

    Attributes:
        proj_dim: Output dimension.
    """

    proj_dim: int = 512
    proj_max_batch_size: int = 32


@_params_dataclass
class TRAKProjectionParams(GeneralProjectionParams):
    """TRAK projection (defaults: ``proj_dim=512``, ``proj_max_batch_size=32``)."""

    proj_dim: int = 512
    proj_max_batch_size: int = 32


@_params_dataclass
class DVEmbProjectionParams(BaseProjectionParams):
    """DVEmb projection (default: no projection).

    Attributes:
        proj_dim_per_layer: Projected dimension per layer, ``None`` for none.
    """

    proj_dim_per_layer: int | None = None
    proj_type: str = "identity"


@_params_dataclass
class RandomProjectionParams(GeneralProjectionParams):
    """Everything :func:`dattri.func.projection.random_project` needs.

    ``proj_dim``, ``proj_max_batch_size``, ``proj_seed``,
    ``feature_batch_size`` and ``device`` are required; a str ``device`` is
    converted to ``torch.device``.

    Attributes:
        feature_batch_size: Batch size of the sample features.
        device: Device of the projection.
    """

    # ``field()`` without default: plain annotations would inherit the base
    # class defaults and silently stop being required.
    proj_max_batch_size: int = dataclasses.field()
    proj_seed: int = dataclasses.field()
    feature_batch_size: int = dataclasses.field()
    device: torch.device = dataclasses.field()


__all__ = [
    "PROJ_TYPES",
    "BaseProjectionParams",
    "DVEmbProjectionParams",
    "FactGraSSProjectionParams",
    "FactGrassProjectionParams",
    "GeneralProjectionParams",
    "LoGraProjectionParams",
    "RandomProjectionParams",
    "TRAKProjectionParams",
    "TracInProjectionParams",
]
