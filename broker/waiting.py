"""Requests for arena space that wait for room: parked by priority, retried when memory is freed, timed out."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ArenaFull, BrokerError
from .protocol import Message

__all__ = ["Parked", "Waiting"]


@dataclass(eq=False, slots=True)
class Parked:
    """A request for arena space waiting for room."""

    deadline: float
    session: Any  # the server's Session (compared by identity only)
    msg: Message
    attempt: Callable[[], Message | None]
    error: Callable[[], ArenaFull]


class Waiting:
    """Parked requests by priority (lower first), first come first served within one."""

    def __init__(self) -> None:
        self.queues: dict[int, collections.deque[Parked]] = {}
        self.count = 0

    def downstream(self) -> int:
        """Parked reservations of a stage after the first (workers waiting to write results)."""
        return sum(len(q) for priority, q in self.queues.items() if priority <= -2)

    def add(self, priority: int, parked: Parked) -> None:
        self.queues.setdefault(priority, collections.deque()).append(parked)
        self.count += 1

    def sweep(self, now: float, done: Callable[[Parked, Message | BrokerError], None],
              expired_only: bool = False) -> None:
        """Try each parked request (or only time out the expired ones); ``done`` gets each answer."""
        for priority in sorted(self.queues):
            queue, keep = self.queues[priority], collections.deque[Parked]()
            for p in queue:
                try:
                    answer: Message | BrokerError | None = None if expired_only else p.attempt()
                except BrokerError as e:
                    answer = e
                if answer is None and now >= p.deadline:
                    answer = p.error()
                if answer is None:
                    keep.append(p)
                else:
                    done(p, answer)
            self.count -= len(queue) - len(keep)
            if keep:
                self.queues[priority] = keep
            else:
                del self.queues[priority]

    def forget(self, session: Any) -> None:
        for priority, queue in list(self.queues.items()):
            keep = collections.deque(p for p in queue if p.session is not session)
            self.count -= len(queue) - len(keep)
            if keep:
                self.queues[priority] = keep
            else:
                del self.queues[priority]
