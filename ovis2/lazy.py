"""Lazy public names for a package: nothing is imported until a name is used."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module `__getattr__` that imports `package.<exports[name]>` on first use of `name`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    return __getattr__
