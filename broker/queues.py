"""The broker's side of the handle queues (``queue.py``): which exist, making one, giving back a dead receiver's items.

A queue is made on its first ``queue_open`` and lives as long as the broker.
When a client is dropped, the items it got from a redelivering queue and did
not release go back to that queue (``queue.requeue``). A queue whose mutex a
live process holds at that moment is tried again at the next tick
(``retry``): the broker never waits on a client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import BadRequest
from .holds import ControlRegion
from .queue import SLOT_WORDS, counters, init_queue, owner_word, queue_words, requeue

__all__ = ["Queues", "QueueEntry"]

log = logging.getLogger("shmbroker.broker")


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One queue: where its block lies and what its first user asked for."""

    offset: int  # data offset of its block
    maxsize: int
    redeliver: int
    slot_words: int = SLOT_WORDS


class Queues:
    """The broker's queues by name, and the give-backs still to do."""

    def __init__(self, region: ControlRegion | None, address: int) -> None:
        self.region = region  # None: the broker keeps no holds, so no queues
        self.address = address  # where byte 0 of the arena is mapped in the broker
        self.by_name: dict[str, QueueEntry] = {}
        self.later: list[tuple[str, int]] = []  # (queue name, owner word) whose mutex was busy

    def open(self, name: str, maxsize: int, redeliver: int, new_block: Callable[[int], int],
             slot_words: int = SLOT_WORDS) -> QueueEntry:
        """The queue ``name``, made on first use in a block of ``new_block(nbytes)`` (its data
        offset; it raises when the arena has no room)."""
        found = self.by_name.get(name)
        if found is None:
            if self.region is None:
                raise BadRequest("queue: this broker keeps no holds in shared memory (no membarrier "
                                 "on this host); queues need them")
            offset = new_block(queue_words(maxsize, redeliver, slot_words) * 8)
            init_queue(self.region.words, self.address, offset, maxsize, redeliver, slot_words)
            slots = maxsize * (2 if redeliver else 1)  # the pending entries name blocks too
            self.region.register_queue(offset, slots, slot_words)
            found = self.by_name[name] = QueueEntry(offset, maxsize, redeliver, slot_words)
        if redeliver and redeliver != found.redeliver:
            raise BadRequest(f"queue {name!r} was made with redeliver={found.redeliver} by its first "
                             f"user; open it with that (or without redeliver=)")
        return found

    def counters(self, name: str) -> dict[str, Any]:
        """The size, pending items and stage counters of queue ``name`` (``queue.counters``);
        all 0 for a queue that was never made (a pipeline whose queues found no room)."""
        q = self.by_name.get(name)
        if q is None or self.region is None:
            return dict.fromkeys(("queue", "pending", "done", "out", "in", "busy", "copied", "span"), 0)
        return counters(self.region.words, q.offset)

    def gone(self, slot: int) -> list[tuple[str, int, list[bytes]]]:
        """The client of hold-table slot ``slot`` is gone: its pending items go back. Returns,
        per queue where any were, (name, items given back, the msgpack of those dropped instead:
        delivered ``redeliver`` times already)."""
        if self.region is not None and self.by_name:
            return self._give_back(owner_word(slot, self.region.epoch(slot)), list(self.by_name))
        return []

    def retry(self) -> list[tuple[str, int, list[bytes]]]:
        """Again for the queues whose mutex was busy; returns what ``gone`` does."""
        later, self.later = self.later, []
        out = []
        for name, owner in later:
            out += self._give_back(owner, [name])
        return out

    def _give_back(self, owner: int, names: list[str]) -> list[tuple[str, int, list[bytes]]]:
        assert self.region is not None
        out: list[tuple[str, int, list[bytes]]] = []
        for name in names:
            q = self.by_name[name]
            if not q.redeliver:
                continue
            done = requeue(self.region.words, self.address, q.offset, owner)
            if done is None:
                self.later.append((name, owner))
                continue
            moved, dropped = done
            if moved:
                log.info("queue %r: %d item(s) of a receiver that is gone given back", name, moved)
            if dropped:
                log.warning("queue %r: %d item(s) dropped after %d redeliveries (every receiver died "
                            "holding them)", name, len(dropped), q.redeliver)
            if moved or dropped:
                out.append((name, moved, dropped))
        return out
