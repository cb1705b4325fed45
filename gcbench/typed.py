"""Typed, validated dataclasses: the one way gcbench states a schema (experiments, records, configs).

Every config and record is a pydantic dataclass that refuses unknown fields. Scalars are strict (``true``
is not an integer, ``"8"`` is not a number), containers are lax (a TOML or JSON list fills a tuple). Each
field's help text, range and default live on the field itself; the experiment loader, the command line's
option help and the documentation's key table all read them from there. :func:`load` turns a mapping
into an instance and a validation failure into one :class:`~gcbench.errors.UsageError` line that names
the key (or the flag or file that set it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic.fields import FieldInfo
from typing_extensions import dataclass_transform

from gcbench.errors import UsageError

T = TypeVar("T")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a number too
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


def key(
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    flag: str | None = None,
    metavar: str | None = None,
    shown_type: str | None = None,
    **constraints: Any,
) -> Any:
    """A field's help, its command-line flag (if it has one), its default and its range (``ge=1``, ...).

    ``shown_type`` names the type in the documentation where its annotation would not say it well.
    """
    named = (("flag", flag), ("metavar", metavar), ("shown_type", shown_type))
    extra: dict[str, Any] = {name: value for name, value in named if value}
    if default is not dataclasses.MISSING:
        constraints["default"] = default
    return Field(description=help, json_schema_extra=extra or None, **constraints)


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field, key))
def typed(cls: type[T]) -> type[T]:
    """``@typed``: a frozen pydantic dataclass (validated on construction and by ``dataclasses.replace``)."""
    return dataclass(frozen=True, config=CONFIG)(cls)  # type: ignore[return-value]


@dataclass_transform(field_specifiers=(dataclasses.field, Field, key))
def typed_mutable(cls: type[T]) -> type[T]:
    """``@typed_mutable``: as :func:`typed`, for a record filled in as it is measured (validated when built)."""
    return dataclass(frozen=False, config=CONFIG)(cls)  # type: ignore[return-value]


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}  # by class: building an adapter takes a while


def adapter(cls: type[T]) -> TypeAdapter[T]:
    found = _ADAPTERS.get(cls)
    if found is None:
        found = _ADAPTERS[cls] = TypeAdapter(cls)
    return found


def fields_of(cls: type) -> dict[str, FieldInfo]:
    """The fields of a :func:`typed` class, by name, in declaration order."""
    if not is_pydantic_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a @typed class")
    return cls.__pydantic_fields__


def dump(value: Any) -> Any:
    """JSON-ready data (tuples become lists)."""
    return adapter(type(value)).dump_python(value, mode="json")


def load(cls: type[T], data: Any, label: Callable[[tuple[str | int, ...]], str] | str = "") -> T:
    """``cls`` from ``data``; a UsageError naming where the first bad value came from otherwise.

    ``label``: a prefix, or a function from the bad value's location (``("sweep", "repeats")``) to the
    name a user knows it by (a flag, or ``file: sweep.repeats``).
    """
    try:
        return adapter(cls).validate_python(data)
    except ValidationError as error:
        raise UsageError(describe(error, label)) from None


def describe(error: ValidationError, label: Callable[[tuple[str | int, ...]], str] | str = "") -> str:
    """One line for the first problem: ``--repeats: must be >= 1, got 0``."""
    first = error.errors(include_url=False)[0]
    location = tuple(part for part in first["loc"] if not isinstance(part, int))
    name = (
        label(location) if callable(label) else ".".join([label, *map(str, location)] if label else map(str, location))
    )
    return f"{name}: {_message(first)}" if name else _message(first)


def _message(error: Mapping[str, Any]) -> str:
    kind, context, value = error["type"], error.get("ctx") or {}, error.get("input")
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than": ("<", "lt"),
        "less_than_equal": ("<=", "le"),
    }
    if kind in bounds:
        sign, name = bounds[kind]
        return f"must be {sign} {context[name]}, got {value!r}"
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "tuple_type": "a list",
        "list_type": "a list",
        "dict_type": "a table",
        "dataclass_type": "a table",
        "dataclass_args_type": "a table",
    }
    if kind in expected:
        return f"expected {expected[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"unknown value {value!r}; choose from {context.get('expected', '')}"
    if kind == "too_short":
        return f"expected at least {context.get('min_length', 1)} item(s), got {value!r}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return "unknown key"
    if kind == "missing" or kind == "missing_argument":
        return "missing"
    if kind == "value_error":
        return str(context.get("error", error["msg"]))
    message = str(error["msg"])
    return message[:1].lower() + message[1:]
