"""Results that work in sync and in asyncio code alike.

The seed's users wrote asyncio code against methods that distbreaker's sync classes
answer at once (`reset()`, `get_system_health()`, ...). These results are the plain value
and are also awaitable, to the same value, so ``b.reset()`` and ``await b.reset()`` both
work on one object; the work is done when the method returns either way.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

__all__ = ["COMPLETED", "AwaitableDict", "AwaitableList", "Completed"]

T = TypeVar("T")


class Completed:
    """An action that has already happened; awaiting it returns None at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator: makes this awaitable

    def __repr__(self) -> str:
        return "<completed>"


COMPLETED = Completed()


class AwaitableDict(dict[str, Any]):
    """A dict that may also be awaited (to itself)."""

    def __await__(self) -> Generator[Any, None, AwaitableDict]:
        return self
        yield


class AwaitableList(list[T]):
    """A list that may also be awaited (to itself)."""

    def __await__(self) -> Generator[Any, None, AwaitableList[T]]:
        return self
        yield
