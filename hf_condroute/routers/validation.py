"""Field rules of the configs, declared on the fields themselves (`field(metadata={"check": ...})`) and checked by
`check_fields` when a config is built or loaded, so a bad value is named at config time, never deep in torch.

Every failure is a `ConfigError` (a ValueError); a value of the wrong type is a `ConfigTypeError`, which is also a
TypeError, so `except ValueError` catches every bad config and `except TypeError` the wrong types."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A config field has a value it cannot take; the message names the field, the value and the fix."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field has a value of the wrong type."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    optional: bool = False  # None is allowed (it means "the default")
    fix: str = ""  # how to put it right, when the rule alone does not say

    def check(self, owner: str, name: str, value: Any) -> None:
        if value is None:
            if not self.optional:
                raise ConfigTypeError(f"{owner}.{name} must be {self.describe()}, got None.{self._fix()}")
            return
        self.check_value(owner, name, value)

    def fail(self, owner: str, name: str, value: Any, type_error: bool = False) -> None:
        what = f"{self.describe()} or None" if self.optional else self.describe()
        cls = ConfigTypeError if type_error else ConfigError
        raise cls(f"{self.prefix(value)}{owner}.{name} must be {what}, got {value!r}.{self._fix()}")

    def prefix(self, value: Any) -> str:
        return ""

    def _fix(self) -> str:
        return f" {self.fix}" if self.fix else ""

    def describe(self) -> str:
        raise NotImplementedError

    def check_value(self, owner: str, name: str, value: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Number(Rule):
    """An integer (`integer=True`) or a finite real number within bounds; `*_open` excludes the bound itself."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right} ({kind})"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low} ({kind})"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high} ({kind})"
        return kind

    def check_value(self, owner: str, name: str, value: Any) -> None:
        if not (_is_int(value) if self.integer else _is_number(value)):
            # NaN and infinity are numbers of the right type out of every range; the rest are the wrong type
            wrong_type = isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float))
            self.fail(owner, name, value, type_error=wrong_type)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            self.fail(owner, name, value)
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            self.fail(owner, name, value)


def Integer(low: int | None = None, **kw) -> Number:
    return Number(integer=True, low=low, **kw)


def Real(low: float | None = None, **kw) -> Number:
    return Number(integer=False, low=low, **kw)


@dataclass(frozen=True)
class Flag(Rule):
    def describe(self) -> str:
        return "True or False"

    def check_value(self, owner: str, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.fail(owner, name, value, type_error=True)


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple = ()
    label: str = ""  # "activation": the message starts "Unknown activation 'x': "

    def describe(self) -> str:
        names = [repr(v) for v in self.values]
        return " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)

    def prefix(self, value: Any) -> str:
        return f"Unknown {self.label} {value!r}: " if self.label else ""

    def check_value(self, owner: str, name: str, value: Any) -> None:
        if value not in self.values:
            self.fail(owner, name, value, type_error=not isinstance(value, str))


@dataclass(frozen=True)
class Text(Rule):
    """A string, or with `many=True` a list of strings."""

    many: bool = False

    def describe(self) -> str:
        return "a list of module paths (strings)" if self.many else "a string"

    def check_value(self, owner: str, name: str, value: Any) -> None:
        items = value if self.many and isinstance(value, (list, tuple)) else [value]
        if (self.many and not isinstance(value, (list, tuple))) or not all(isinstance(v, str) and v for v in items):
            self.fail(owner, name, value, type_error=True)


@dataclass(frozen=True)
class ExpertList(Rule):
    """A non-empty list of expert indices (a tag-to-expert mapping)."""

    def describe(self) -> str:
        return "a non-empty list of expert indices (integers)"

    def check_value(self, owner: str, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or not value or not all(_is_int(e) for e in value):
            self.fail(owner, name, value, type_error=True)


@dataclass(frozen=True)
class PatternMap(Rule):
    """{regex on the block name: list of expert indices}."""

    def describe(self) -> str:
        return "a dict {regex on the block name: list of expert indices}"

    def check_value(self, owner: str, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            self.fail(owner, name, value, type_error=True)
        for pattern, mapping in value.items():
            if not isinstance(pattern, str):
                self.fail(owner, name, value, type_error=True)
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"{owner}.{name} must be keyed by valid regular expressions, got {pattern!r} ({err}). Fix the "
                    "pattern, or escape a literal block name with re.escape."
                ) from None
            ExpertList(fix=self.fix).check(owner, f"{name}[{pattern!r}]", mapping)


def check_fields(config: Any) -> None:
    """Apply the `check` rule of every dataclass field of `config` that declares one."""
    owner = type(config).__name__
    for f in fields(config):
        rule = f.metadata.get("check")
        if rule is not None:
            rule.check(owner, f.name, getattr(config, f.name))
