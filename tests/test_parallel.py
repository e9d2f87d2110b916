"""``parallel.for_each`` (bounded workers over an iterable) and ``errors.single_errors``."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from blobstore.errors import BadInput, ChunkMissing, StoreUnavailable, single_errors
from blobstore.parallel import for_each

pytestmark = pytest.mark.anyio


class Tracker:
    """Counts calls in flight; the first ``hold`` calls wait until that many are in."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.in_flight = 0
        self.most = 0
        self.done: list[int] = []
        self.full = anyio.Event()

    async def __call__(self, item: int) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= self.hold:
            self.full.set()
        await self.full.wait()
        await anyio.lowlevel.checkpoint()
        self.in_flight -= 1
        self.done.append(item)


@pytest.mark.parametrize(("concurrency", "expected"), [(3, 3), (1, 1), (0, 1), (-5, 1), (50, 10)])
async def test_every_item_once_and_never_more_than_concurrency(
    concurrency: int, expected: int
) -> None:
    track = Tracker(hold=expected)
    await for_each(range(10), track, concurrency)
    assert sorted(track.done) == list(range(10))
    assert track.most == expected


async def test_items_are_taken_lazily() -> None:
    """No task (or list) per item: while the workers are busy, only their items were read."""
    taken: list[int] = []
    gate = anyio.Event()
    busy = 0

    def items() -> Iterator[int]:
        for i in range(1_000_000):
            taken.append(i)
            yield i

    async def work(item: int) -> None:
        nonlocal busy
        busy += 1
        if busy == 4:
            assert len(taken) == 4  # the fifth item has not been pulled yet
            gate.set()
        await gate.wait()
        if item == 20:
            raise BadInput("stop here")

    with pytest.raises(BadInput):
        await for_each(items(), work, 4)
    assert len(taken) < 100  # a million items, stopped at the 21st: not all read up front


async def test_empty_input_returns() -> None:
    calls: list[int] = []

    async def work(item: int) -> None:
        calls.append(item)

    await for_each([], work, 8)
    assert calls == []


async def test_first_failure_cancels_the_rest_and_is_raised_alone() -> None:
    cancelled: list[int] = []
    started = 0
    all_started = anyio.Event()

    async def work(item: int) -> None:
        nonlocal started
        started += 1
        if started == 3:
            all_started.set()
        if item == 1:
            await all_started.wait()
            raise ChunkMissing("ab" * 32, "origin")
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise

    with pytest.raises(ChunkMissing) as info:
        await for_each(range(100), work, 3)
    assert isinstance(info.value.__cause__, BaseExceptionGroup)
    assert sorted(cancelled) == [0, 2]
    assert started == 3  # no item was started after the failure


# -- single_errors ------------------------------------------------------------------


def raise_in(group: BaseExceptionGroup[BaseException]) -> BaseException:
    try:
        with single_errors():
            raise group
    except BaseException as exc:  # what single_errors raised in the group's place
        return exc
    raise AssertionError("single_errors swallowed the group")


def test_a_blobstore_error_wins_over_others() -> None:
    mine = BadInput("bad size")
    group = ExceptionGroup("workers", [ValueError("x"), OSError(5, "EIO"), mine])
    got = raise_in(group)
    assert got is mine
    assert got.__cause__ is group


def test_os_error_wins_over_other_exceptions() -> None:
    disk = OSError(28, "No space left on device")
    assert raise_in(ExceptionGroup("g", [KeyError("k"), disk])) is disk


def test_nested_groups_are_searched_and_the_first_of_a_kind_wins() -> None:
    first, second = StoreUnavailable("first"), StoreUnavailable("second")
    inner = ExceptionGroup("inner", [ValueError("v"), first])
    group = ExceptionGroup("outer", [inner, ExceptionGroup("more", [second])])
    assert raise_in(group) is first


def test_base_exceptions_only() -> None:
    interrupt = KeyboardInterrupt()
    assert raise_in(BaseExceptionGroup("g", [interrupt])) is interrupt


def test_a_plain_exception_passes_unchanged_and_no_error_is_no_error() -> None:
    plain = BadInput("not a group")
    with pytest.raises(BadInput) as info, single_errors():
        raise plain
    assert info.value is plain
    assert info.value.__cause__ is None
    with single_errors():
        pass
