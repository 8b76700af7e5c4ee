"""Package namespaces whose names are imported on first use (PEP 562).

A package ``__init__`` that re-exports its torch-heavy modules eagerly makes every import of a light
submodule (a config dataclass, say) pay for torch. With ``lazy_exports`` the package lists what it
exports, and each name is imported from its module the first time someone asks for it:

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"trainer": ["Trainer"], "config": ["TrainConfig"]})
"""

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``, exporting ``exports`` (submodule name ->
    the names it defines that the package re-exports)."""
    home = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__, sorted(home)
