"""A tiny name -> class registry shared by attacks, models and guides (`cgd.attacks.list()`, `cgd.guides.list()`,
`cgd.models.list()` all answer from one of these)."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Callable, Generic, TypeVar

from . import CGDError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, **params) -> T:
        """An instance of `name` built with `params`; unknown names and parameters are one `CGDError`."""
        obj = self.cls(name)
        try:
            inspect.signature(obj).bind(**params)
        except TypeError as e:
            raise CGDError(f"bad parameters for {self.kind} {name!r}: {e}") from None
        return obj(**params)

    def cls(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise CGDError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def list(self, filter: str = "*") -> dict[str, str]:
        """Registered names matching the shell-style pattern `filter` (e.g. "*sig*"), each with its one-line
        summary, in name order."""
        return {n: self.summary(n) for n in self.names() if fnmatch.fnmatchcase(n, filter)}

    def summary(self, name: str) -> str:
        """The first paragraph of the entry's docstring, on one line."""
        return " ".join((self.cls(name).__doc__ or "").strip().split("\n\n")[0].split())
