"""Typed job configs <-> YAML <-> command-line flags. The flag set *is* the dataclass field set, so they
cannot drift; nested dataclasses become dotted sections (``--train.max_steps 200``).

A field's ``metadata`` may hold ``help`` (its --help line) and ``positional=True``.
Unknown keys and flags fail naming the nearest valid one; bad values fail naming their dotted key.
"""

import argparse
import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lmstack.errors import ConfigError


def field(default: Any = dataclasses.MISSING, *, help: str, positional: bool = False,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its command-line help (``default_factory`` for lists and sections)."""
    metadata = {"help": help, "positional": positional}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", overrides_only: bool = False) -> None:
    """Add one flag (or positional argument) per field of dataclass ``cls``; a nested dataclass field
    becomes a section of dotted flags (``--train.max_steps``).

    With ``overrides_only`` (jobs configured by a YAML file) no flag has a default or is required: the
    parsed namespace then holds exactly the flags given, ready for ``apply_overrides``.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_arguments(parser, kind, prefix=f"{prefix}{f.name}.", overrides_only=overrides_only)
            continue
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif kind is bool and overrides_only:  # `--train.compile`, `--train.compile false`
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list and not overrides_only:
            (item,) = typing.get_args(kind)  # `lmstack embed "a" "b" ...`, `--calibration a.txt b.txt`
            kwargs.update(nargs="+", type=item)
        elif kind in (str, Path) and overrides_only:  # a text field takes the text as typed, colons and all
            kwargs["type"] = Verbatim
        else:
            kwargs["type"] = kind if kind in (int, float, str, Path) else str
        if f.metadata.get("positional") and not prefix:
            parser.add_argument(f.name, **kwargs)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default is not None:
            kwargs["help"] += f" (default: {default})"
        if overrides_only:
            kwargs["default"] = argparse.SUPPRESS
        elif default is not dataclasses.MISSING:
            kwargs["default"] = default
        else:
            kwargs["required"] = not optional
        flag = "--" + prefix + f.name.replace("_", "-") if not prefix else "--" + prefix + f.name
        parser.add_argument(flag, dest=prefix + f.name, **kwargs)


class Verbatim(str):
    """A command-line value for a text field: ``apply_overrides`` keeps it as typed instead of reading it as
    YAML (``--peft.prompt_init_text "Answer: yes"`` is a string, not a mapping)."""


def _parse_bool(text: str) -> bool:
    value = _parse_text(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def from_namespace(cls: type, namespace: argparse.Namespace, prefix: str = "") -> Any:
    """Build dataclass ``cls`` (nested sections included) from parsed arguments."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_namespace(kind, namespace, prefix=f"{prefix}{f.name}.")
        else:
            value = getattr(namespace, prefix + f.name)
            values[f.name] = check_text(value, prefix + f.name) if isinstance(value, str) else value
    return cls(**values)


def check_text(value: str, key: str) -> str:
    """``value`` if it is valid Unicode text; command-line bytes that are not UTF-8 reach Python as lone
    surrogates, which would fail far from here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: the value is not valid UTF-8 text") from None
    return value


MAX_SEED = 2**32 - 1


def check_seed(seed: int | None, key: str = "seed") -> None:
    """Seeds are integers in [0, 2**32): every generator and data order derived from them stays in range."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"{key}={seed!r} must be an integer in [0, {MAX_SEED}]")


# --- dataclass <-> dict <-> YAML, with dotted overrides -------------------------------------------------------

def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (YAML) mapping, checking every key and value.

    Raises:
        ConfigError: an unknown key (naming the nearest valid one), a missing required key, or a value of
            the wrong type, each named by its dotted path (e.g. ``train.max_steps``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {sorted(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {prefix}{f.name!r} is required")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def _coerce(annotation: Any, value: Any, path: str) -> Any:
    """``value`` checked (and, where lossless, converted) against ``annotation``."""
    kind, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {path!r} must not be null")
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, prefix=path + ".")
    if typing.get_origin(kind) is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"config key {path!r} is {value!r}; expected one of {list(typing.get_args(kind))}")
        return value
    if typing.get_origin(kind) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
        item = (typing.get_args(kind) or (Any,))[0]
        items = [v if item is Any else _coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if typing.get_origin(kind) is tuple else items
    return _coerce_scalar(kind, value, path)


def _coerce_scalar(kind: Any, value: Any, path: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return check_text(value, path)
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        return value  # Any, or a type this mapper does not police
    raise ConfigError(f"config key {path!r} must be {kind.__name__}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a dataclass (Paths as strings, tuples as lists): what YAML stores."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def save_yaml(config: Any, path: Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    from lmstack.fileio import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    return Path(path)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with dotted keys (``"train.max_steps": 200``) set; strings are read as YAML
    scalars ("200" -> 200, "true" -> True, "[1, 2]" -> [1, 2]) so command-line text gets its type."""
    merged = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
            node = child
        if isinstance(value, Verbatim):
            node[leaf] = str(value)  # plain text again (YAML writes no subclass)
        else:
            node[leaf] = _parse_text(value) if isinstance(value, str) else value
    return merged


def _parse_text(text: str) -> Any:
    """A command-line value as YAML would read it, plus "1e-3"-style numbers (YAML 1.1 wants a dot)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def resolve(cls: type, config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance."""
    data = load_yaml(config_file) if config_file is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or {}))
