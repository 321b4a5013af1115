"""The internal module paths of dattri <= 0.3 and where their contents live now.

``dattri.algorithm.feature_store`` & co. moved into the phase sub-packages
(``runtime``, ``features``, ``store``, ``solve``, ``score``). For one release the old
paths stay importable: :func:`install_aliases` registers, for each old path, a module
that re-exports the public names of its new home(s) (with a ``DeprecationWarning``
when it is first imported by name).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED", "install_aliases"]

#: old module name (under ``dattri.algorithm``) -> its new module(s).
MOVED: dict[str, tuple[str, ...]] = {
    "_args": ("runtime.loader_args",),
    "batching": ("runtime.batching",),
    "distributed": ("runtime.distributed",),
    "validation": ("runtime.validation",),
    "projected_store": ("features.gradients", "store.in_memory"),
    "block_projected_compress": ("features.block_compress",),
    "feature_store": ("store.memmap_store",),
    "store_integrity": ("store.integrity",),
    "scaled_features": ("store.scaled",),
    "block_projected_store": ("store.host_rows",),
    "if_base": ("solve.mean_hvp",),
    "if_precondition": ("solve.preconditioners",),
    "if_solvers": ("solve.ihvp_solvers",),
    "scoring": ("score.tiles",),
    "topk": ("score.topk",),
}
_PACKAGE = "dattri.algorithm"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``dattri.algorithm.<old>`` as a module re-exporting its new home(s)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The spec of an old path (None for every other module)."""
        prefix, _, name = fullname.rpartition(".")
        if prefix != _PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        name = spec.name.rpartition(".")[2]
        targets = [f"{_PACKAGE}.{t}" for t in MOVED[name]]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(targets)}; the old path will be removed "
            "in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        module = types.ModuleType(spec.name, f"Moved to {', '.join(targets)}.")
        exported: list[str] = []
        for target in targets:
            new = importlib.import_module(target)
            public = getattr(new, "__all__", [n for n in vars(new) if not n.startswith("_")])
            for attr in public:
                setattr(module, attr, getattr(new, attr))
            exported.extend(public)
        module.__all__ = exported
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: :meth:`create_module` filled the module."""


def install_aliases() -> None:
    """Make the old internal paths importable (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
