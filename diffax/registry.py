"""Small name -> object registries, so a config can choose any component by name."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection filled with the `register` decorator.

    An unknown name raises a ValueError that lists the valid names and the
    closest ones, with the config field it came from.
    """

    def __init__(self, kind: str, field: str):
        self.kind = kind  # e.g. "schedule"
        self.field = field  # e.g. "config.diffusion.schedule"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown {self.kind} {name!r} in {self.field}.{hint} "
                f"Valid names: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items
