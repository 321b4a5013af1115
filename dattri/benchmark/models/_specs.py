"""Input/output sizes of the datasets the benchmark models are built for."""

from __future__ import annotations

#: dataset name -> (flattened input dim, number of classes)
DATASET_SPECS: dict[str, tuple[int, int]] = {
    "mnist": (784, 10),
    "digits": (64, 10),
    "digits_binary": (64, 2),
    "cifar10": (3072, 10),
    "cifar2": (3072, 2),
}


def dataset_spec(dataset: str) -> tuple[int, int]:
    """Return ``(in_dim, n_classes)`` of a known dataset.

    Raises:
        ValueError: If ``dataset`` is unknown.
    """
    try:
        return DATASET_SPECS[dataset]
    except KeyError:
        msg = (
            f"Unknown dataset {dataset!r}; available: {sorted(DATASET_SPECS)}. "
            "Construct the model class directly for other sizes."
        )
        raise ValueError(msg) from None
