"""The busy-poll policy (`mcpx.busypoll`): the loop polls for a window after each message sent, stops polling
after a run of wasted spins and tries again later, and never polls when turned off. Driven on a real event loop
with a clock the test moves."""

from __future__ import annotations

import asyncio

from mcpx.busypoll import MAX_MISSES, RETRY_AFTER, BusyPoll


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def turns(count: int = 3) -> None:
    """Let the loop run a few rounds of ready callbacks (a spin re-arms itself once per round)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def spin_out(poll: BusyPoll, clock: Clock, *, message: bool) -> None:
    """One spin after a message sent: a message comes in during it (or not), then its window passes."""
    poll.sent()
    assert poll.spinning
    await turns()
    assert poll.spinning  # still within the window: polling, round after round
    if message:
        poll.received()
    clock.now += poll.window
    await turns()
    assert not poll.spinning


async def test_a_message_sent_makes_the_loop_poll_until_the_window_has_passed() -> None:
    clock = Clock()
    poll = BusyPoll(500, clock=clock)
    await spin_out(poll, clock, message=True)


async def test_each_message_sent_extends_the_window() -> None:
    clock = Clock()
    poll = BusyPoll(500, clock=clock)
    poll.sent()
    clock.now += 0.0004
    poll.sent()  # 400 µs in: the window now ends 500 µs from here
    clock.now += 0.0004
    await turns()
    assert poll.spinning
    clock.now += 0.0002
    await turns()
    assert not poll.spinning


async def test_wasted_spins_stop_the_polling_until_it_is_tried_again() -> None:
    clock = Clock()
    poll = BusyPoll(500, clock=clock)
    for _ in range(MAX_MISSES):
        await spin_out(poll, clock, message=False)
    poll.sent()
    assert not poll.spinning  # nothing came in during the last spins: no more polling for now
    clock.now += RETRY_AFTER
    await spin_out(poll, clock, message=False)  # one more try, wasted: off again at once
    poll.sent()
    assert not poll.spinning
    clock.now += RETRY_AFTER
    await spin_out(poll, clock, message=True)  # this try paid off: polling is back for good
    for _ in range(MAX_MISSES - 1):
        await spin_out(poll, clock, message=False)
    await spin_out(poll, clock, message=True)


async def test_a_spin_that_pays_off_resets_the_count_of_wasted_ones() -> None:
    clock = Clock()
    poll = BusyPoll(500, clock=clock)
    for _ in range(3):
        for _ in range(MAX_MISSES - 1):
            await spin_out(poll, clock, message=False)
        await spin_out(poll, clock, message=True)
    poll.sent()
    assert poll.spinning


async def test_a_window_of_zero_never_polls() -> None:
    poll = BusyPoll(0, clock=Clock())
    poll.sent()
    assert not poll.spinning
