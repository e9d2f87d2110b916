"""The shape every async resource shares: ``async with`` opens, exit closes."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """Base for resources opened with ``async with`` and closed with ``aclose()``.

    Subclasses implement ``open`` (raise on failure; partial state is released
    through ``aclose``) and ``aclose`` (idempotent).
    """

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
