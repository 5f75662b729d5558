"""A tiny name -> class registry shared by attacks, models and guides."""

from __future__ import annotations

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
        if name not in self._items:
            raise CGDError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name](**params)

    def cls(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise CGDError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
