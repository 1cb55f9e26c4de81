"""One registry helper for every kind of named component (backbones, heads, pair losses, necks,
miners), as timm's ``register_model`` / ``list_models``: registration sits next to the definition,
and an unknown name raises one error that lists the valid ones.

    BACKBONES = Registry("backbone")

    @BACKBONES.register("resnet18")
    def resnet18(**kw): ...

    BACKBONES.names()          # ['resnet18', ...] in registration order
    BACKBONES.get("resnet18")  # the function; UnknownNameError for a name not registered
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import FacefuseError

T = TypeVar("T")


class UnknownNameError(FacefuseError, ValueError):
    """A name that is not in a registry; the message lists the valid names."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """``@registry.register("name")`` above a definition, or ``registry.register("name", obj)``."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r}: use letters, digits, '_' and '-' only")

        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown(name)) from None

    def unknown(self, name) -> str:
        """The one error text for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}"

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

