"""Typed, validated dataclasses: the one way gcbench states a schema (experiments, records, configs).

Every config and record is a pydantic dataclass that refuses unknown fields. Scalars are strict (``true``
is not an integer, ``"8"`` is not a number), containers are lax (a TOML or JSON list fills a tuple). Each
field's help text, range and default live on the field itself; the experiment loader, the command line's
option help and the documentation's key table all read them from there. :func:`load` turns a mapping
into an instance and a validation failure into one :class:`~gcbench.errors.UsageError` line that names
the key (or the flag or file that set it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from gcbench.errors import UsageError

T = TypeVar("T")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a number too
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


def typed(cls: type[T] | None = None, *, frozen: bool = True) -> Any:
    """``@typed``: a pydantic dataclass (validated on construction and by ``dataclasses.replace``)."""
    def wrap(klass: type[T]) -> type[T]:
        return dataclass(frozen=frozen, config=CONFIG)(klass)  # type: ignore[no-any-return]
    return wrap if cls is None else wrap(cls)


def key(help: str, *, flag: str | None = None, metavar: str | None = None, **constraints: Any) -> Any:
    """A field's help, its command-line flag (if it has one) and its range (``ge=1``, ``lt=1.0``, ...)."""
    extra = {name: value for name, value in (("flag", flag), ("metavar", metavar)) if value is not None}
    return Field(description=help, json_schema_extra=extra or None, **constraints)


@functools.cache
def adapter(cls: type[T]) -> TypeAdapter[T]:
    return TypeAdapter(cls)


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
    name = label(location) if callable(label) else ".".join([label, *map(str, location)] if label else
                                                           map(str, location))
    return f"{name}: {_message(first)}" if name else _message(first)


def _message(error: Mapping[str, Any]) -> str:
    kind, context, value = error["type"], error.get("ctx") or {}, error.get("input")
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than": ("<", "lt"),
              "less_than_equal": ("<=", "le")}
    if kind in bounds:
        sign, name = bounds[kind]
        return f"must be {sign} {context[name]}, got {value!r}"
    expected = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
                "string_type": "a string", "tuple_type": "a list", "list_type": "a list", "dict_type": "a table",
                "dataclass_type": "a table", "dataclass_args_type": "a table"}
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
