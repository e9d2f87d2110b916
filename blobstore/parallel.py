"""Bounded parallelism: N workers over an iterable, inside a task group."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import anyio

from .errors import single_errors

T = TypeVar("T")


async def for_each(
    items: Iterable[T], func: Callable[[T], Awaitable[None]], concurrency: int
) -> None:
    """Await ``func(item)`` for every item, at most ``concurrency`` at a time.

    Memory stays bounded however many items there are (no task per item).
    The first failure cancels the rest and is raised on its own (not grouped).
    """
    iterator = iter(items)

    async def worker() -> None:
        for item in iterator:  # shared: each item is taken by exactly one worker
            await func(item)

    with single_errors():
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, concurrency)):
                tg.start_soon(worker)
