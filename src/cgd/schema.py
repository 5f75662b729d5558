"""Declarative checks of keyword arguments read from untrusted files: each constructor declares, once, the type and
range of every parameter (`{"num_classes": Int(1, 100_000), ...}`) and `check_params` holds a dict to it.

Types are exact: a JSON `true` is not an integer, `"64"` is not a number, `1.0` is not an integer. A `Real` takes an
integer too (JSON writes `1.0` as `1` in some tools), never a boolean, never NaN or infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import CGDError


def show(value) -> str:
    """A short rendering of an untrusted value for an error message."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int

    def check(self, value, where: str) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise CGDError(f"{where} must be an integer in {self.lo}..{self.hi}; got {show(value)}")
        return value


@dataclass(frozen=True)
class Real:
    """A finite number in (lo, hi], or [lo, hi] with `closed`."""

    lo: float
    hi: float
    closed: bool = False

    def check(self, value, where: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not self.lo <= value <= self.hi \
                or (value == self.lo and not self.closed):
            raise CGDError(f"{where} must be a number in {'[' if self.closed else '('}{self.lo}, {self.hi}]; "
                           f"got {show(value)}")
        return float(value)


@dataclass(frozen=True)
class Flag:
    def check(self, value, where: str) -> bool:
        if type(value) is not bool:
            raise CGDError(f"{where} must be true or false; got {show(value)}")
        return value


@dataclass(frozen=True)
class Ints:
    """Exactly `n` integers in lo..hi (a JSON list or a Python tuple), returned as a tuple."""

    n: int
    lo: int
    hi: int

    def check(self, value, where: str) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) != self.n \
                or any(type(v) is not int or not self.lo <= v <= self.hi for v in value):
            raise CGDError(f"{where} must be a list of {self.n} integers in {self.lo}..{self.hi}; got {show(value)}")
        return tuple(value)


def check_params(schema: dict, params, where: str) -> dict:
    """`params` checked against `schema` (name -> Int/Real/Flag/Ints) and normalised; `where` names the dict in
    errors ("m.json: params" -> "m.json: params.widths must be ...")."""
    if not isinstance(params, dict):
        raise CGDError(f"{where} must be an object of parameters; got {show(params)}")
    unknown = [k for k in params if k not in schema]
    if unknown:
        raise CGDError(f"{where} has an unknown parameter {show(unknown[0])}; known: {', '.join(schema)}")
    return {k: schema[k].check(v, f"{where}.{k}") for k, v in params.items()}


def check_types(where: str, *, ints: dict | None = None, reals: dict | None = None, texts: dict | None = None) -> None:
    """The types of keyword arguments that came from a user's `--param`/`--set` (ranges are the caller's): every
    value in `ints` an integer, in `reals` a finite number, in `texts` a string; None passes (an unset option)."""
    for kinds, ok, what in ((ints, lambda v: type(v) is int, "an integer"),
                            (reals, lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
                            (texts, lambda v: type(v) is str, "a string")):
        for k, v in (kinds or {}).items():
            if v is not None and not ok(v):
                raise CGDError(f"{where}: {k} must be {what}; got {show(v)}")
