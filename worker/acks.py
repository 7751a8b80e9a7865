"""Acknowledging source messages in arrival order, once all their effects are safe.

Each received QoS 1 message gets an :class:`Entry` holding one count per outstanding
effect: one per QoS 1 publish (released by its PUBACK), one for its historian rows
(released when the batch is committed or in the outbox), and one for the handler
itself while it runs. An entry whose count reaches zero is acknowledged only when every
entry before it on the same connection has been, so the broker's view ("everything up
to here is done") is always true.

After a reconnect the broker redelivers what was not acknowledged. The new queue starts
behind a barrier that opens when the old queue's last entry is released, so nothing
acknowledged on the new connection overtakes work still pending from the old one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["AckQueue", "Entry"]


class Entry:
    __slots__ = ("key", "packet_id", "queue", "waiting")

    def __init__(self, queue: AckQueue, packet_id: int, key: tuple[str, bytes] | None) -> None:
        self.queue = queue
        self.packet_id = packet_id
        self.key = key
        self.waiting = 1

    def hold(self) -> None:
        self.waiting += 1

    def release(self) -> None:
        self.waiting -= 1
        if not self.waiting:
            self.queue.settle()


class AckQueue:
    """The unacknowledged messages of one connection, oldest first."""

    def __init__(self, send: Callable[[int], None]) -> None:
        self._send = send
        self._entries: deque[Entry] = deque()
        self._on_empty: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, packet_id: int, key: tuple[str, bytes] | None = None) -> Entry:
        """A new entry, held once for the caller (release it when handling is done)."""
        entry = Entry(self, packet_id, key)
        self._entries.append(entry)
        return entry

    def after(self, previous: AckQueue) -> None:
        """Acknowledge nothing until ``previous`` has released all its entries."""
        if not previous._entries:
            return
        barrier = self.add(0)
        previous._on_empty.append(barrier.release)

    def pending_keys(self) -> set[tuple[str, bytes]]:
        """(topic, payload) of the messages not yet acknowledged."""
        return {e.key for e in self._entries if e.key is not None}

    def settle(self) -> None:
        entries = self._entries
        send = self._send
        while entries and not entries[0].waiting:
            packet_id = entries.popleft().packet_id
            if packet_id:
                send(packet_id)
        if not entries and self._on_empty:
            callbacks, self._on_empty = self._on_empty, []
            for callback in callbacks:
                callback()
