"""Typed, validated options: config dataclasses built from YAML mappings or ``--set key=value``
strings, with their names, types and declared bounds checked in one place (:func:`build_config`).

```python
@dataclass
class FetchConfig:
    timeout: float = bounded(10.0, gt=0)  # a time: positive (and, as every float option, finite)
    retries: int = bounded(2, ge=0)  # a count: not negative
```
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

from mmcurate.errors import UsageError


@dataclass(frozen=True)
class Bounds:
    """Limits of a numeric option: ``ge``/``le`` inclusive, ``gt`` exclusive. They apply to the
    option's value and to every number inside it (a list's items, a mapping's values)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def __str__(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else ""
        return ", ".join(part for part in (low, high) if part)

    def describe(self) -> str:
        """The rule, to follow "must": ``be positive``, ``not be negative``, ``be between 0 and 1``..."""
        if self.ge is not None and self.le is not None:
            return f"be between {self.ge:g} and {self.le:g}"
        if self.gt == 0 and self.le is None:
            return "be positive"
        if self.ge == 0 and self.le is None:
            return "not be negative"
        low = f"at least {self.ge:g}" if self.ge is not None else f"more than {self.gt:g}" if self.gt is not None else ""
        high = f"at most {self.le:g}" if self.le is not None else ""
        return "be " + " and ".join(part for part in (low, high) if part)

    def check(self, value: Any, where: str) -> None:
        """Raise UsageError unless every number in ``value`` lies within the bounds."""
        if isinstance(value, Mapping):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for item in value:
                self.check(item, where)
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        below = (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
        if below or (self.le is not None and value > self.le):
            raise UsageError(f"{where} must {self.describe()}, not {value!r}")


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with :class:`Bounds`, checked by :func:`build_config`: declare them wherever
    a count (``ge=0``), a size or a time (``gt=0``) is meant."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"bounds": Bounds(ge, gt, le)})


def path_option(default: str | None) -> Any:
    """A config field naming a model or model file by path, hub id or name: in a pipeline YAML, a
    relative path that exists beside the YAML resolves against its folder, as input and output paths
    do (``local-dir:`` paths too); anything else (``org/name``) is left as written."""
    return dataclasses.field(default=default, metadata={"path": True})


def is_path_option(field: dataclasses.Field) -> bool:
    """Whether a config field was declared with :func:`path_option`."""
    return bool(field.metadata.get("path"))


def field_bounds(field: dataclasses.Field) -> Bounds | None:
    """The bounds a config field declares, if any."""
    return field.metadata.get("bounds")


def build_config(cls: type, params: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``params``, checking names, types and declared bounds
    (floats must be finite); raise UsageError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown option {unknown[0]!r} (options: {', '.join(fields) or 'none'})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}: option {name!r}") for name, value in params.items()}
    for name, value in values.items():
        bounds = field_bounds(fields[name])
        if bounds is not None:
            bounds.check(value, f"{where}: option {name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (possibly a ``--set`` string) to the annotated type, or raise UsageError."""
    if isinstance(value, str) and hint is not str:
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:  # not YAML (``[``): the text itself, which the type check below refuses
            parsed = value
        if not (isinstance(parsed, str) and _accepts_str(hint)):
            value = parsed
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"{where} must be one of {', '.join(map(str, args))}, not {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return origin(_coerce(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"{where} must be a mapping, not {value!r}")
        key_type, item_type = args or (Any, Any)
        return {_coerce(k, key_type, where): _coerce(v, item_type, where) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false, not {value!r}")
    if hint in (float, int):
        value = _scientific(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} must be a number, not {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise UsageError(f"{where} must be a finite number, not {value!r}")
        return number
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be an integer, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where} must be a string, not {value!r}")
    return value


# Scientific notation that PyYAML (YAML 1.1) reads as text: it wants a dot and a signed exponent (1.0e-3).
_SCIENTIFIC = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _scientific(value: Any) -> Any:
    """A number written in scientific notation (``1e-3``, ``5E-1``, ``1e3``) as the number YAML 1.2
    reads (an integral one as an int); any other value as it is."""
    if not (isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip())):
        return value
    number = Decimal(value.strip())
    integral = number.adjusted() <= 1000 and number == number.to_integral_value()  # 1e999999999 is no int to build
    return int(number) if integral else float(number)


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(hint))
    return False
