"""Typed job configs <-> command-line flags. The flag set *is* the dataclass field set, so they cannot drift.

A field's ``metadata`` may hold ``help`` (its --help line) and ``positional=True``.
Unknown flags are rejected by argparse, which names them; bad values fail with the field's name.
"""

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal


def field(default: Any = dataclasses.MISSING, *, help: str, positional: bool = False) -> Any:
    """A dataclass field carrying its command-line help."""
    metadata = {"help": help, "positional": positional}
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag (or positional argument) per field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind if kind in (int, float, str, Path) else str
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
        else:
            kwargs["required"] = not optional
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build dataclass ``cls`` from parsed arguments."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
