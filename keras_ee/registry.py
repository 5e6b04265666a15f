"""One shape for every name -> thing table: model presets, datasets and training methods.

As timm's `register_model` / `list_models`: each domain keeps one `Registry` and exposes
`register_<thing>`, `list_<things>` and `get_<thing>` built on it, so a name is looked up,
listed and refused the same way everywhere ("unknown dataset 'cifar1000'; available: ...").

Example:

    presets: Registry[Preset] = Registry("model preset")
    presets.register("multiexit_cnn", Preset(...))
    presets.get("multiexit_cnn"); presets.names()  # ["multiexit_cnn"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind.

    Args:
        kind: what an entry is, in words ("model preset", "dataset", "training method"): the
            errors name it.
        hint: appended to the unknown-name error, e.g. how to add an entry.
        load: called before every lookup or listing (to import built-ins or plug-ins lazily);
            it may call `register`.
    """

    def __init__(self, kind: str, hint: str = "", load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.hint = hint
        self._load = load
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Adds `entry` under `name` and returns it; a taken name is refused unless `replace`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string; received {name!r}.")
        if name in self._entries and not replace:
            raise ValueError(f"a {self.kind} named {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def copy(self) -> Registry[T]:
        """A registry with the same kind, hint, loader and entries (a test's throwaway table)."""
        twin: Registry[T] = Registry(self.kind, self.hint, self._load)
        twin._entries = dict(self._entries)
        return twin

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            self._load()
        return self._entries

    def get(self, name: object) -> T:
        """The entry named `name`.

        Raises:
            ValueError: `name` is not a string, or no entry has it (the error lists the names).
        """
        if not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a string; received {name!r}.")
        entries = self._loaded()
        if name not in entries:
            hint = f" {self.hint}" if self.hint else ""
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}.{hint}")
        return entries[name]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._loaded())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._loaded())
