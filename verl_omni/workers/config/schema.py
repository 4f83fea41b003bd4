"""Declarative config sections: each field's type, range and choices are declared beside it, and one function
turns any violation into the recipe's one-line message, ``<full.dotted.key>=<value!r> <what is valid>``.

A section is a frozen pydantic dataclass in strict mode (``"3"`` is not 3, ``true`` is not 1, ``inf`` is not a
number, an unknown key is refused): to verl, Hydra and pickle still a plain dataclass, checked whenever it is
built. Importing this module loads pydantic, not verl or torch, so the recipe checks a config before those load.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that breaks its declaration. ``relative`` starts with the key inside its section; the
    message puts the section's dotted path in front. ``unknown`` (keys given, keys valid) marks unknown keys."""

    def __init__(self, relative: str, prefix: str = "", unknown: tuple[list[str], list[str]] | None = None) -> None:
        self.relative, self.prefix, self.unknown = relative, prefix, unknown
        where = ".".join(filter(None, [prefix, relative]))
        super().__init__(f"Unknown key(s) {unknown[0]} in {where}; valid keys: {unknown[1]}" if unknown else where)

    def under(self, prefix: str) -> ConfigError:
        """The same error for the section at ``prefix``."""
        return ConfigError(self.relative, prefix, self.unknown)

    def inside(self, key: str) -> ConfigError:
        """The same error seen from the section that holds this one at ``key``."""
        return ConfigError(".".join(filter(None, [key, self.relative])), self.prefix, self.unknown)


def option(
    default: Any, *, why: str | None = None, note: str | None = None, sampling: bool = False, **rules: Any
) -> Any:
    """A field with its rules (pydantic's ``ge``, ``gt``, ``le``, ``lt``, ``pattern``...) and its message: ``why``
    replaces the text derived from the type and rules (``{choices}`` and ``{<other field>}`` are filled in),
    ``note`` is added in parentheses. ``sampling`` marks a per-request sampling parameter."""
    extra = {k: v for k, v in (("why", why), ("sampling", sampling)) if v}
    return Field(default, description=note, json_schema_extra=extra or None, **rules)


class Section:
    """Base of the sections: ``from_config`` reads one from a YAML section; ``PREFIX`` is its dotted path."""

    PREFIX: ClassVar[str] = ""

    @classmethod
    def from_config(cls: type[T], section: Any, prefix: str | None = None) -> T:
        """An instance as is; None as the defaults; a dict or OmegaConf section checked, errors under ``prefix``
        (default: the section's own path)."""
        if isinstance(section, cls):
            return section
        return parse(cls, section, cls.PREFIX if prefix is None else prefix)


def section(prefix: str, *, closed: bool = True) -> Callable[[type[T]], type[T]]:
    """Make ``cls`` a checked section at dotted path ``prefix``. ``closed=False`` for sections verl also reads:
    only the declared keys are checked, the others pass through."""
    config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid" if closed else "ignore")

    def wrap(cls: type[T]) -> type[T]:
        checked = pydantic_dataclass(frozen=True, kw_only=True, config=config)(cls)
        init = checked.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as err:
                raise _config_error(checked, err, kwargs) from None

        checked.__init__ = __init__
        checked.PREFIX = prefix
        return checked

    return wrap


def parse(cls: type[T], data: Any, prefix: str) -> T:
    """Build ``cls`` from a dict or OmegaConf section (None: the defaults), nested sections first; a ``_target_``
    key the section does not declare is dropped. Errors name keys under ``prefix``."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(data, resolve=True)
    try:
        return _build(cls, data)
    except ConfigError as err:
        raise err.under(prefix) from None


def _build(cls: type[T], data: dict[str, Any]) -> T:
    fields = cls.__pydantic_fields__
    values = {k: v for k, v in data.items() if k != "_target_" or k in fields}
    for name, info in fields.items():
        nested = _section_type(info.annotation)
        if nested is not None and isinstance(values.get(name), dict):
            try:
                values[name] = _build(nested, values[name])
            except ConfigError as err:
                raise err.inside(name) from None
    return cls(**values)


def _config_error(cls: type, err: ValidationError, given: dict[str, Any]) -> ConfigError:
    """The first violation of ``err`` as one line naming the key, the value and what is valid."""
    first = err.errors()[0]
    unknown = sorted(str(e["loc"][-1]) for e in err.errors() if e["type"] == "unexpected_keyword_argument")
    if unknown:
        return ConfigError("", cls.PREFIX, (unknown, [name for name in cls.__pydantic_fields__ if name != "_target_"]))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a rule between fields, raised by the section's __post_init__
        return cause.under(cls.PREFIX)
    if not first["loc"]:
        return ConfigError(str(cause), cls.PREFIX)
    key = str(first["loc"][0])  # a list item's error is reported as its list's
    info = cls.__pydantic_fields__[key]
    shown = getattr(cls, "KEYS", {}).get(key, key)
    values = {name: given.get(name, field.default) for name, field in cls.__pydantic_fields__.items()}
    return ConfigError(f"{shown}={given.get(key)!r}{_spaced(describe(info, values))}", cls.PREFIX)


def _spaced(why: str) -> str:
    return why if why.startswith(":") else f" {why}"


def _section_type(annotation: Any) -> type | None:
    for arg in (annotation, *_args(annotation)):
        if isinstance(arg, type) and is_dataclass(arg) and hasattr(arg, "__pydantic_fields__"):
            return arg
    return None


def _args(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()


def describe(info: FieldInfo, values: dict[str, Any] | None = None) -> str:
    """What a field accepts, in words, from its declaration; a ``why`` may name the section's other ``values``."""
    annotation = info.annotation
    nullable = type(None) in _args(annotation)
    base = next((a for a in _args(annotation) if a is not type(None)), annotation)
    choices = ", ".join(str(c) for c in get_args(base)) if get_origin(base) is Literal else ""
    why = (info.json_schema_extra or {}).get("why") if isinstance(info.json_schema_extra, dict) else None
    if why:
        return why.format(choices=choices, **(values or {}))
    if choices:
        text = f"is not valid; valid choices: {choices}{', null' if nullable else ''}"
        return f"{text} ({info.description})" if info.description else text
    if base is bool:
        text = "is not valid; valid choices: true, false"
    elif base in (int, float):
        text = _number_rule(base, info.metadata)
    elif base is str:
        text = "must be a string"
    elif get_origin(base) is list:
        text = "must be a list"
    else:
        text = "is not valid"
    if info.description:
        text += f" ({info.description})"
    return text + (" or null" if nullable else "")


def _number_rule(kind: type, metadata: list[Any]) -> str:
    low = next((m for m in metadata if isinstance(m, Ge | Gt)), None)
    high = next((m for m in metadata if isinstance(m, Le | Lt)), None)
    lo = None if low is None else (low.ge if isinstance(low, Ge) else low.gt)
    hi = None if high is None else (high.le if isinstance(high, Le) else high.lt)
    if low is not None and high is not None:
        left, right = "[" if isinstance(low, Ge) else "(", "]" if isinstance(high, Le) else ")"
        span = f"{left}{lo:g}, {hi:g}{right}"
        return f"must be an integer in {span}" if kind is int else f"is outside the valid range {span}"
    if kind is int and isinstance(low, Ge) and lo in (0, 1) and high is None:
        return "must be a positive integer" if lo == 1 else "must be a non-negative integer"
    bound = ""
    if low is not None:
        bound = f" {'>=' if isinstance(low, Ge) else '>'} {lo:g}"
    elif high is not None:
        bound = f" {'<=' if isinstance(high, Le) else '<'} {hi:g}"
    return f"must be {'an integer' if kind is int else 'a finite number'}{bound}"
