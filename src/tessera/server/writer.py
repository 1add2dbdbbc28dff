"""What the check-in and activation writer threads share: taking a batch off their queue,
settling the requests' futures on their event loops, and letting go of a connection.

Both writers (``checkins.py``, ``activations.py``) keep one DB-API connection per thread
and answer requests that wait on an event loop; each wake of a loop costs a write to its
self-pipe, so a batch's results reach a loop in one hand-over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

__all__ = ["Job", "gather_turn", "release_connection", "settle", "take_batch"]

RequestT = TypeVar("RequestT")

log = logging.getLogger("tessera.server")


@dataclass(slots=True)
class Job(Generic[RequestT]):
    """A request waiting on its event loop for the writer's outcome."""

    request: RequestT
    now: datetime
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def gather_turn(
    pending: dict[asyncio.AbstractEventLoop, list[Job[Any]]],
    job: Job[Any],
    flush: Callable[[asyncio.AbstractEventLoop], object],
) -> None:
    """Add ``job`` to the jobs of this turn of its event loop; the first of a turn
    schedules ``flush(loop)``, which runs after the turn's other callbacks (the other
    requests that arrived with it), so it finds them all in ``pending``."""
    waiting = pending.get(job.loop)
    if waiting is None:
        pending[job.loop] = [job]
        job.loop.call_soon(flush, job.loop)
    else:
        waiting.append(job)


def take_batch(
    jobs: queue.SimpleQueue[Any], first: object, limit: int, stop: object
) -> tuple[list[Any], bool]:
    """``first`` and whatever else queued meanwhile, up to ``limit``; and whether ``stop``
    came (the thread ends after this batch)."""
    batch = [first]
    while len(batch) < limit:
        try:
            more = jobs.get_nowait()
        except queue.Empty:
            break
        if more is stop:
            return batch, True
        batch.append(more)
    return batch, False


def settle(batch: Sequence[Job[Any]], outcomes: Sequence[Any], *, on_loop: bool = False) -> None:
    """Settle each job's future with its outcome (an exception fails it), on its loop.

    From a writer thread, one hand-over per loop and batch; ``on_loop`` when the caller
    is that loop (the batch ran right there).
    """

    def resolve(settled: list[tuple[Job[Any], Any]]) -> None:
        for job, outcome in settled:
            if job.future.done():  # the client went away and the request was cancelled
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    pairs = list(zip(batch, outcomes, strict=True))
    if on_loop:
        resolve(pairs)
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job[Any], Any]]] = {}
    for job, outcome in pairs:
        by_loop.setdefault(job.loop, []).append((job, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            loop.call_soon_threadsafe(resolve, settled)


def release_connection(connection: Any, *, broken: bool) -> None:
    """Invalidate ``connection`` if it may be broken, else close it (back to the pool)."""
    if connection is not None:
        try:
            connection.invalidate() if broken else connection.close()
        except Exception:  # already broken: nothing more to release
            log.debug("releasing a writer's connection failed", exc_info=True)
