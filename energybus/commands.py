"""The command state machine: every accepted ``set`` becomes a record that moves
accepted -> sent -> confirmed | rejected | expired.

It is part of the contract because every layer speaks of it: adapters create and move
records, the historian stores them and the worker reports them.

Records are immutable snapshots; each transition returns a new one, which the caller
stores (the historian keeps them as the source platform's ``command_logs``). The book
holds only commands still waiting for an outcome, so it stays as small as the number of
commands in flight.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final, Literal

import msgspec

from energybus.payloads import Scalar
from energybus.topics import Topic

__all__ = ["FINAL_STATES", "CommandBook", "CommandRecord", "CommandState"]

CommandState = Literal["refused", "accepted", "sent", "confirmed", "rejected", "expired"]
FINAL_STATES: Final = frozenset({"refused", "confirmed", "rejected", "expired"})

# An ACK may overtake the broker's PUBACK for the command it answers, so an outcome is
# allowed straight from ``accepted``.
_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "accepted": frozenset({"sent", "confirmed", "rejected", "expired"}),
    "sent": frozenset({"confirmed", "rejected", "expired"}),
}


class CommandRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One command, from the canonical ``set`` that asked for it to its outcome.

    ``id`` is the correlation id the source platform echoes in its ACK (the VEN's
    ``correlationId``, the plant's ``cmdId``). ``target`` names the device on the source
    side; ``action`` and ``payload`` are the source command as sent.
    """

    id: str
    adapter: str
    site: str
    entity_type: str
    entity_id: str
    metric: str
    value: Scalar | None
    """The requested value; ``None`` only for a refused ``set`` whose payload had none."""
    target: str
    action: str
    payload: dict[str, Any] | None
    state: CommandState
    accepted_at: datetime
    expires_at: datetime
    sent_at: datetime | None = None
    acked_at: datetime | None = None
    response_status: str | None = None
    """The status text of the source's ACK, as sent (``accepted``, ``ok``, ``error``)."""
    reason: str | None = None
    """Why a command ended ``refused``, ``rejected`` or ``expired``, for people."""
    code: str | None = None
    """The stable code of a refusal (``stale_command``, ``interlock`` ...), to count and
    query by; docs/errors.md lists them."""

    @classmethod
    def refusal(
        cls,
        *,
        command_id: str,
        adapter: str,
        topic: Topic,
        value: Scalar | None,
        code: str,
        reason: str,
        at: datetime,
    ) -> CommandRecord:
        """The record of a ``set`` refused before it reached the source: final at once."""
        return cls(
            id=command_id,
            adapter=adapter,
            site=topic.site,
            entity_type=topic.entity_type,
            entity_id=topic.entity_id,
            metric=topic.metric,
            value=value,
            target="",
            action="",
            payload=None,
            state="refused",
            accepted_at=at,
            expires_at=at,
            reason=reason,
            code=code,
        )


class CommandBook:
    """The commands of one adapter that still wait for an outcome."""

    def __init__(self, *, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        self.timeout = timedelta(seconds=timeout_s)
        self._pending: dict[str, CommandRecord] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def get(self, command_id: str) -> CommandRecord | None:
        return self._pending.get(command_id)

    def deadline(self, accepted_at: datetime) -> datetime:
        return accepted_at + self.timeout

    def accept(self, record: CommandRecord) -> CommandRecord:
        if record.state != "accepted":
            raise ValueError(f"a new command must be 'accepted', not {record.state!r}")
        if record.id in self._pending:
            raise ValueError(f"command id {record.id!r} is already in flight")
        self._pending[record.id] = record
        return record

    def sent(self, command_id: str, at: datetime) -> CommandRecord | None:
        """The broker took the command; ``None`` if it already has an outcome."""
        record = self._pending.get(command_id)
        if record is None or record.state != "accepted":
            return None
        return self._move(record, "sent", sent_at=at)

    def acked(
        self,
        command_id: str,
        *,
        ok: bool,
        status: str,
        at: datetime,
        reason: str | None = None,
    ) -> CommandRecord | None:
        """The source answered; ``None`` when no command with that id is in flight.
        ``reason`` is the source's own explanation of a refusal, when it gives one."""
        record = self._pending.get(command_id)
        if record is None:
            return None
        if not ok:
            answered = f"the source answered {status!r}"
            reason = f"{answered}: {reason}" if reason else answered
        return self._move(
            record,
            "confirmed" if ok else "rejected",
            acked_at=at,
            response_status=status,
            reason=None if ok else reason,
        )

    def progress(self, command_id: str, status: str) -> CommandRecord | None:
        """The source reported progress (``DISPATCHED``) without an outcome: the record
        keeps its state and carries the status; ``None`` when nothing is in flight."""
        record = self._pending.get(command_id)
        if record is None:
            return None
        moved = msgspec.structs.replace(record, response_status=status)
        self._pending[command_id] = moved
        return moved

    def end(self, command_id: str, state: CommandState, reason: str) -> CommandRecord | None:
        """The source ended the command without answering it (it failed, or timed out on
        the source's side): ``rejected`` or ``expired`` with the source's reason."""
        record = self._pending.get(command_id)
        if record is None:
            return None
        return self._move(record, state, reason=reason)

    def fail(self, command_id: str, reason: str) -> CommandRecord | None:
        """The command could not be sent at all."""
        record = self._pending.get(command_id)
        if record is None:
            return None
        return self._move(record, "rejected", reason=reason)

    def expire(self, now: datetime) -> list[CommandRecord]:
        """Commands past their deadline without an answer, now ``expired``."""
        expired = []
        # Deadlines grow with insertion order (one timeout per book), so the scan stops
        # at the first command still in time.
        for record in list(self._pending.values()):
            if record.expires_at > now:
                break
            expired.append(self._move(record, "expired", reason=f"no answer within {self.timeout}"))
        return expired

    def _move(self, record: CommandRecord, state: CommandState, **changes: Any) -> CommandRecord:
        if state not in _ALLOWED.get(record.state, ()):
            raise ValueError(f"command {record.id!r} cannot go from {record.state} to {state}")
        moved = msgspec.structs.replace(record, state=state, **changes)
        if state in FINAL_STATES:
            del self._pending[record.id]
        else:
            self._pending[record.id] = moved
        return moved
