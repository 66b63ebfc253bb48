"""Spec errors, and the helpers the schema's checks use to report them."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A job spec is wrong. ``errors`` holds every (field path, message) found."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        first = _format(*self.errors[0])
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(first + more)

    def lines(self) -> list[str]:
        return [_format(path, msg) for path, msg in self.errors]

    def __reduce__(self):  # travels whole (a Ray worker's error reaches the driver)
        return (type(self), (self.errors,))


def _format(path: str, msg: str) -> str:
    return f"{path}: {msg}" if path else msg


class FieldErrors(Exception):
    """Raised by ``__post_init__`` checks; the loader prefixes the dataclass's path."""

    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__(errors[0][1])
        self.errors = errors

    def __reduce__(self):
        return (type(self), (self.errors,))


class Checks:
    """Collects every failed check of a ``__post_init__``, then raises them together.

        with Checks() as check:
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
    """

    def __enter__(self) -> "Checks":
        self.failed: list[tuple[str, str]] = []
        return self

    def __call__(self, ok: bool, field_name: str, message: str) -> None:
        if not ok:
            self.failed.append((field_name, message))

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None and self.failed:
            raise FieldErrors(self.failed)


def documented(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)
