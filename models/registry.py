"""Name-to-factory registries for models and datasets.

A registry maps a short name (``"mmoe"``) to a factory: a class or function that builds the object.
Factories are added by a decorator at import time. Packages outside this project add theirs through
an entry-point group, which is loaded the first time a name is looked up, so a user adds a model or a
dataset without editing this project.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered factory with the metadata that tools such as the budget sizer read."""

    name: str
    factory: Callable[..., Any]
    # Integer keyword argument that the budget sizer tunes after ``width`` to land closer to a
    # target parameter count, or None when the model has no such knob.
    fine_knob: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """A mapping from names to factories, filled by :meth:`register`.

    Args:
        kind: What the registry holds, in the singular (``"model"``); used in error messages.
        entry_point_group: Entry-point group scanned for factories of installed packages.

    Example:
        >>> widgets = Registry("widget", entry_point_group=None)
        >>> @widgets.register("square")
        ... def square(side: int) -> int:
        ...     return side * side
        >>> widgets.build("square", side=3)
        9
    """

    def __init__(self, kind: str, entry_point_group: str | None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(
        self, name: str, *, override: bool = False, fine_knob: str | None = None, **metadata: Any
    ) -> Callable[[F], F]:
        """Return a decorator that registers a factory under ``name``.

        Raises:
            ValueError: If ``name`` is taken and ``override`` is False.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")

        def decorator(factory: F) -> F:
            if name in self._entries and not override:
                existing = self._entries[name].factory
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered "
                    f"(by `{existing.__module__}.{existing.__qualname__}`). "
                    f"Pick another name, or pass `override=True` to replace it."
                )
            self._entries[name] = Entry(name, factory, fine_knob, dict(metadata))
            return factory

        return decorator

    def get(self, name: str) -> Entry:
        """Return the entry registered under ``name``.

        Raises:
            KeyError: If no factory has that name; the message lists the registered names.
        """
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            available = sorted(self._entries)
            # Compared in lower case, so that `MMoE` still suggests `mmoe`.
            lowered = {entry.lower(): entry for entry in available}
            close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1)
            hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(available) or 'none'}. "
                f"Register a new one with `@register_{self.kind}({name!r})`, or load a module that "
                f"does with `--plugin`."
            ) from None

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the factory registered under ``name`` with ``kwargs``."""
        return self.get(name).factory(**kwargs)

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_entry_points(self) -> None:
        # Importing an entry point's module runs its `register` decorators.
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            try:
                entry_point.load()
            except Exception as error:  # A broken plugin must not hide the built-in entries.
                logger.warning(
                    "Could not load %s plugin %r from entry point group %r: %s",
                    self.kind, entry_point.value, self.entry_point_group, error,
                )
