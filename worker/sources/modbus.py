"""The Modbus poller: reads devices on a schedule and writes the setpoints they are sent.

An adapter declares its devices (:class:`~energybus.adapters.ModbusEndpoint`: where, which
unit, which reads, how often); this source does the I/O with pymodbus:

- **Lines.** Devices that share a connection (a TCP gateway, an RTU-over-TCP bridge, a
  serial port) form one line with one client, polled one after another; every line runs
  in a task of its own, so a device that does not answer delays only its own line. A poll
  stops at its first read that gets no answer at all, so a dead device costs its line
  about ``timeout_s`` times its tries per poll.
- **Polls.** Each device is polled every ``interval_s`` on a fixed schedule (a poll that
  overruns skips the slots it missed rather than bunching up). A read that fails is
  retried ``retries`` times with a short backoff; a poll with some reads failed is
  handed over with those reads marked; after ``offline_after`` polls without any answer
  the device's series go ``offline``, and its next answer brings them back.
- **The poll outbox.** Every poll is written to a SQLite file (WAL) before it is handed
  over, and deleted once its effects are safe (its publishes acknowledged by the broker,
  its rows committed or in the historian's outbox). Polling never waits for the broker
  or the database: while they are down, polls wait in this outbox, in order, and are
  handed over when the bus is back; after a crash the next run hands over what was not
  finished (the historian's key stores each row once). It is bounded: when full, new
  polls are counted as dropped and logged once.
- **Writes.** A write request from the adapter (a ``set`` that passed the interlocks)
  goes to its device's line ahead of the polls. Nothing is written after the command's
  deadline, nor when a register it was encoded against (a scale factor) no longer holds
  what it did; otherwise write the registers, read them back (on a new connection when
  the write went unanswered: the read-back says whether the device took it), and hand
  the result over for the adapter to confirm or reject the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from energybus.adapters import ModbusEndpoint
from energybus.adapters.modbus import (
    WriteResult,
    poll_payload,
    read_write_request,
    unreachable_payload,
    write_result,
)
from energybus.historian.outbox import open_wal
from energybus.messages import Message

from ..acks import AckQueue
from ..logs import StateLog
from ..metrics import Metrics
from .base import CommandToken, Delivery, Gate, Source

__all__ = ["ModbusSource", "PollOutbox"]

log = logging.getLogger("energybus.worker.source")

_BATCH: Final = 500
"""Polls read from the outbox per round of handing over."""
_DELETE_EVERY_S: Final = 0.05


class PollOutbox:
    """Polls on disk, oldest first, until their effects are safe.

    WAL with ``synchronous=NORMAL``: a poll written survives the worker being killed (the
    operating system has it); a power cut may cost the last moments, which the device
    could not have given twice anyway.
    """

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db = open_wal(path, synchronous="NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS polls ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,"
            " payload BLOB NOT NULL)"
        )
        rows, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM polls"
        ).fetchone()
        self.rows: int = rows
        self.size: int = size
        self._sizes: dict[int, int] = {}

    def put(self, device: str, payload: bytes) -> int | None:
        """Store a poll; ``None`` (nothing stored) when the outbox is full."""
        if self.size + len(payload) > self.max_bytes:
            return None
        cursor = self._db.execute(
            "INSERT INTO polls (device, payload) VALUES (?, ?)", (device, payload)
        )
        row_id = cursor.lastrowid
        assert row_id is not None
        self.rows += 1
        self.size += len(payload)
        self._sizes[row_id] = len(payload)
        return row_id

    def after(self, cursor: int, limit: int = _BATCH) -> list[tuple[int, str, bytes]]:
        rows: list[tuple[int, str, bytes]] = self._db.execute(
            "SELECT id, device, payload FROM polls WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, limit),
        ).fetchall()
        for row_id, _, payload in rows:
            self._sizes.setdefault(row_id, len(payload))
        return rows

    def delete(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany("DELETE FROM polls WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")
            raise
        self.rows -= len(ids)
        self.size -= sum(self._sizes.pop(i, 0) for i in ids)

    def close(self) -> None:
        self._db.close()


class _Device:
    __slots__ = ("due", "endpoint", "failures", "polls", "state", "verified")

    def __init__(self, endpoint: ModbusEndpoint, metrics: Metrics) -> None:
        self.endpoint = endpoint
        self.polls = {
            outcome: metrics.modbus_polls.labels(endpoint.name, outcome)
            for outcome in ("ok", "partial", "failed")
        }
        """The device's poll counters, labelled once."""
        self.due = 0.0
        self.failures = 0
        self.state = StateLog(log)
        self.verified = -1
        """The line's connection on which the device's identity was last checked."""


class _Line:
    """Devices on one connection and the write requests waiting for it."""

    def __init__(self, key: str, devices: list[_Device]) -> None:
        self.key = key
        self.devices = devices
        self.writes: deque[tuple[_Device, Message, CommandToken]] = deque()
        self.wake = asyncio.Event()
        self.client: Any = None
        self.generation = 0
        """Counts the line's connections: a device is identified again on each."""


class ModbusSource(Source):
    transport = "modbus"

    def __init__(
        self,
        *,
        name: str,
        endpoints: Sequence[ModbusEndpoint],
        outbox: Path,
        outbox_max_bytes: int,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        gate: Gate,
    ) -> None:
        super().__init__(deliver=deliver, gate=gate)
        self.name = name
        self.metrics = metrics
        self.outbox_path = outbox
        self.outbox_max_bytes = outbox_max_bytes
        self.outbox: PollOutbox | None = None
        grouped: dict[str, list[_Device]] = {}
        self.devices: dict[str, _Device] = {}
        for endpoint in endpoints:
            device = _Device(endpoint, metrics)
            self.devices[endpoint.name] = device
            grouped.setdefault(endpoint.connection, []).append(device)
        self.lines = [_Line(key, devices) for key, devices in grouped.items()]
        self._line_of = {d.endpoint.name: line for line in self.lines for d in line.devices}
        self._wake = asyncio.Event()
        self._done: list[int] = []
        self._acks = AckQueue(self._done.append)
        self._full = StateLog(log)
        self._full.state = "ok"  # said only when it stops taking polls and when it takes them again
        self._writing = 0
        self._cursor = 0
        """The last poll handed over (polls after it wait in the outbox)."""

    # Running ----------------------------------------------------------------------------

    async def run(self) -> None:
        while self.outbox is None:
            try:
                self.outbox = PollOutbox(self.outbox_path, max_bytes=self.outbox_max_bytes)
            except (sqlite3.Error, OSError) as error:
                # Polls are kept there before anything else: no polling without it.
                self._full.change(
                    "unopened",
                    logging.ERROR,
                    "%s: cannot open the poll outbox %s (%s); no polling until it opens",
                    self.name,
                    self.outbox_path,
                    error,
                )
                await asyncio.sleep(5.0)
        if self.outbox.rows:
            log.info(
                "%s: the poll outbox holds %d polls from an earlier run; handing them over first",
                self.name,
                self.outbox.rows,
            )
        self._gauges()
        self._wake.set()
        tasks = [
            asyncio.create_task(self._line(line), name=f"modbus {line.key}") for line in self.lines
        ]
        tasks.append(asyncio.create_task(self._hand_over(), name=f"{self.name} outbox"))
        tasks.append(asyncio.create_task(self._forget(), name=f"{self.name} deletes"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _gauges(self) -> None:
        if self.outbox is not None:
            self.metrics.poll_outbox_rows.set(self.outbox.rows)
            self.metrics.poll_outbox_bytes.set(self.outbox.size)

    # The outbox -------------------------------------------------------------------------

    def _store(self, device: str, payload: bytes) -> None:
        outbox = self.outbox
        if outbox is None:
            return  # closed: the worker is stopping and polls nothing more
        try:
            stored = outbox.put(device, payload)
        except sqlite3.Error as error:
            # The disk is full or failing: the poll cannot be kept, the line goes on.
            self.metrics.poll_outbox_dropped.inc()
            self._full.change(
                "error",
                logging.ERROR,
                "%s: the poll outbox cannot store polls (%s); they are dropped until it can",
                self.name,
                error,
            )
            return
        if stored is None:
            self.metrics.poll_outbox_dropped.inc()
            self._full.change(
                "full",
                logging.ERROR,
                "%s: the poll outbox is full (%d bytes); new polls are dropped until it drains",
                self.name,
                outbox.size,
            )
            return
        self._full.change("ok", logging.INFO, "%s: the poll outbox takes polls again", self.name)
        self._wake.set()

    async def _hand_over(self) -> None:
        """Hand stored polls to the dispatcher in order, while its gate is open."""
        outbox = self.outbox
        assert outbox is not None
        gate = self.gate
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.consuming:
                if not gate.is_open():
                    await gate.wait_open()
                    continue
                try:
                    rows = outbox.after(self._cursor)
                except sqlite3.Error as error:
                    self._failing("read", error)
                    await asyncio.sleep(1.0)
                    continue
                if not rows:
                    break
                now = datetime.now(UTC)
                for row_id, device, payload in rows:
                    if not gate.is_open() or not self.consuming:
                        break
                    entry = self._acks.add(row_id)
                    self.deliver(Delivery(self.name, device, payload, now, entry))
                    self._cursor = row_id
                self._gauges()
                await asyncio.sleep(0)

    async def _forget(self) -> None:
        """Delete handed-over polls whose effects are safe, a batch at a time."""
        while True:
            await asyncio.sleep(_DELETE_EVERY_S)
            self._delete()

    def _delete(self) -> None:
        if self._done and self.outbox is not None:
            done = list(self._done)
            try:
                self.outbox.delete(done)
            except sqlite3.Error as error:
                # Kept for the next try; a poll not deleted is handed over again after a
                # restart, and stored once.
                self._failing("delete", error)
                return
            del self._done[: len(done)]
            self._gauges()

    def _failing(self, what: str, error: sqlite3.Error) -> None:
        self._full.change(
            f"error:{what}",
            logging.ERROR,
            "%s: the poll outbox cannot %s polls (%s); retrying",
            self.name,
            what,
            error,
        )

    # Polling ----------------------------------------------------------------------------

    def _client(self, endpoint: ModbusEndpoint) -> Any:
        # pymodbus neither retries nor reconnects on its own here: this line does both,
        # with its own backoff, so one device's retries are counted and bounded.
        if endpoint.transport == "rtu":
            assert endpoint.serial_port is not None
            return AsyncModbusSerialClient(
                endpoint.serial_port,
                framer=FramerType.RTU,
                baudrate=endpoint.baudrate,
                bytesize=endpoint.bytesize,
                parity=endpoint.parity,
                stopbits=endpoint.stopbits,
                timeout=endpoint.timeout_s,
                retries=0,
                reconnect_delay=0,
            )
        return AsyncModbusTcpClient(
            endpoint.host,
            port=endpoint.port,
            framer=FramerType.RTU if endpoint.transport == "rtu-over-tcp" else FramerType.SOCKET,
            timeout=endpoint.timeout_s,
            retries=0,
            reconnect_delay=0,
        )

    async def _line(self, line: _Line) -> None:
        line.client = self._client(line.devices[0].endpoint)
        start = time.monotonic()
        for device in line.devices:
            device.due = start
        try:
            while True:
                while line.writes:
                    device, message, token = line.writes.popleft()
                    await self._write(line, device, message, token)
                now = time.monotonic()
                due = min(line.devices, key=lambda d: d.due)
                if due.due > now:
                    line.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(line.wake.wait(), due.due - now)
                    continue
                await self._poll(line, due)
                interval = due.endpoint.interval_s
                due.due += interval
                behind = time.monotonic() - due.due
                if behind > 0:
                    skipped = int(behind // interval) + 1
                    due.due += skipped * interval
                    self.metrics.modbus_overruns.labels(due.endpoint.name).inc(skipped)
        finally:
            with contextlib.suppress(Exception):
                line.client.close()

    async def _connected(self, line: _Line, endpoint: ModbusEndpoint) -> bool:
        client = line.client
        if client.connected:
            return True
        try:
            connected = bool(await asyncio.wait_for(client.connect(), endpoint.timeout_s))
        except Exception:  # refused, unreachable, or the driver's own fault: not connected
            return False
        if connected:
            line.generation += 1
        return connected

    async def _identified(self, line: _Line, device: _Device) -> str | None:
        """Why the device may not be read or written: it is not the device its map
        describes (a SunSpec chain other than the map's), or that cannot be checked.
        Checked once per connection."""
        endpoint = device.endpoint
        if not endpoint.identity or device.verified == line.generation:
            return None
        generation = line.generation
        for address, words in endpoint.identity:
            found, why = await self._read(line, endpoint, "holding", address, len(words))
            if found is None:
                return f"cannot check the device's identity at {address}: {why}"
            if found != list(words):
                return (
                    f"it is not the device its map describes: register {address} holds"
                    f" {found}, the map expects {list(words)} (a SunSpec chain of other"
                    " models or addresses: `energybus modbus scan` it and use a map of its"
                    " own); it is neither read nor written"
                )
        if line.generation == generation:
            device.verified = generation
        return None

    async def _read(
        self, line: _Line, endpoint: ModbusEndpoint, table: str, address: int, count: int
    ) -> tuple[list[int] | None, str]:
        """The registers, or ``None`` and why not, after the endpoint's retries."""
        why = ""
        for attempt in range(endpoint.retries + 1):
            if attempt:
                await asyncio.sleep(endpoint.retry_backoff_s * 2 ** (attempt - 1))
            if not await self._connected(line, endpoint):
                why = f"no connection to {_where(endpoint)}"
                continue
            client = line.client
            call = (
                client.read_holding_registers if table == "holding" else client.read_input_registers
            )
            try:
                response = await asyncio.wait_for(
                    call(address, count=count, device_id=endpoint.unit_id), endpoint.timeout_s * 1.5
                )
            except Exception as error:
                # Whatever the device sent or the driver made of it (a timeout, a broken
                # frame, a pymodbus fault): a failed read with a reason, never a crash of
                # the line, so one device cannot stop the others.
                why = _oneline(error)
                if isinstance(error, TimeoutError | ModbusIOException):
                    # pymodbus says "[Input/Output] No response received after 0 retries".
                    why = f"no answer within {endpoint.timeout_s:g} s"
                # A request that timed out may still be answered later; a fresh connection
                # keeps that answer from being taken for the next request's.
                with contextlib.suppress(Exception):
                    client.close()
                continue
            if response.isError():
                code = getattr(response, "exception_code", None)
                return None, f"exception response {code} to a read of {count} at {address}"
            registers = list(response.registers)
            if len(registers) != count:
                why = f"{len(registers)} registers returned for {count} asked"
                continue
            return registers, ""
        return None, why

    async def _poll(self, line: _Line, device: _Device) -> None:
        endpoint = device.endpoint
        at_ms = int(time.time() * 1000)
        failed: list[bool] = []
        words: list[int] = []
        why = ""
        answered = False
        problem = await self._identified(line, device)
        reads = () if problem else endpoint.reads
        if problem:
            why = problem
        for read in reads:
            registers, reason = await self._read(
                line, endpoint, read.table, read.address, read.count
            )
            if registers is None:
                failed.append(True)
                words.extend([0] * read.count)
                why = why or reason
                # An exception response is an answer: the device is there.
                refused = reason.startswith("exception response")
                answered = answered or refused
                if not refused and not answered:
                    # No answer at all: the other reads would only wait as long again.
                    for rest in endpoint.reads[len(failed) :]:
                        failed.append(True)
                        words.extend([0] * rest.count)
                    break
                continue
            answered = True
            failed.append(False)
            words.extend(registers)
        name = endpoint.name
        if not answered:
            device.polls["failed"].inc()
            device.failures += 1
            if device.failures == 1:
                # Another device than the map's is the configuration's to fix.
                level = logging.ERROR if problem else logging.WARNING
                device.state.change(
                    "failing", level, "modbus device %s: poll failed: %s", name, why
                )
            if device.failures == endpoint.offline_after:
                device.state.change(
                    "offline",
                    logging.ERROR,
                    "modbus device %s: %d polls in a row failed (%s); its series go offline",
                    name,
                    device.failures,
                    why,
                )
                self._store(name, unreachable_payload(at_ms, why))
            return
        device.polls["partial" if any(failed) else "ok"].inc()
        if device.failures:
            device.state.change("ok", logging.INFO, "modbus device %s answers again", name)
        elif any(failed):
            device.state.change("partial", logging.WARNING, "modbus device %s: %s", name, why)
        device.failures = 0
        self._store(name, poll_payload(at_ms, failed, words, fingerprint=endpoint.fingerprint))

    # Writing ----------------------------------------------------------------------------

    def publish(self, message: Message, token: CommandToken) -> None:
        """Queue a write request (``modbus/<device>``) on its device's line."""
        name = message.topic.partition("/")[2]
        line = self._line_of.get(name)
        if line is None:
            token.fail(f"no Modbus device {name!r} is polled by this worker")
            return
        line.writes.append((self.devices[name], message, token))
        line.wake.set()

    async def _write(
        self, line: _Line, device: _Device, message: Message, token: CommandToken
    ) -> None:
        self._writing += 1
        try:
            await self._write_one(line, device, message, token)
        finally:
            self._writing -= 1

    async def _write_one(
        self, line: _Line, device: _Device, message: Message, token: CommandToken
    ) -> None:
        endpoint = device.endpoint
        try:
            request = read_write_request(message.payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            token.fail("the write request does not decode (a defect)")
            return
        if request.expires_ms and time.time() * 1000 >= request.expires_ms:
            token.fail("the command expired before the device's line could write it")
            return
        if not await self._connected(line, endpoint):
            token.fail(f"modbus device {endpoint.name}: no connection to {_where(endpoint)}")
            return
        problem = await self._identified(line, device)
        if problem is not None:
            token.fail(f"modbus device {endpoint.name}: {problem}")
            return
        for address, word in request.guard:
            # What the words were encoded against (a scale factor) must still hold.
            found, why = await self._read(line, endpoint, "holding", address, 1)
            if found is None:
                token.fail(f"modbus device {endpoint.name}: cannot check register {address}: {why}")
                return
            if found[0] != word:
                token.fail(
                    f"the device's scale factor at {address} changed since the command was"
                    " encoded; nothing was written"
                )
                return
        client = line.client
        try:
            if request.multiple:
                call = client.write_registers(
                    request.address, request.words, device_id=endpoint.unit_id
                )
            else:
                call = client.write_register(
                    request.address, request.words[0], device_id=endpoint.unit_id
                )
            response = await asyncio.wait_for(call, endpoint.timeout_s * 1.5)
        except Exception as error:
            # Whether the device took it cannot be known from the write: a fresh
            # connection's read-back says (an equal read-back confirms it).
            with contextlib.suppress(Exception):
                client.close()
            reason = (
                "no answer to the write"
                if isinstance(error, TimeoutError | ModbusIOException)
                else _oneline(error)
            )
            token.uncertain(f"modbus device {endpoint.name}: {reason}")
            words, why = await self._read(
                line, endpoint, "holding", request.address, len(request.words)
            )
            self._written(endpoint, request.command, False, words, f"{reason}; {why}")
            return
        if response.isError():
            code = getattr(response, "exception_code", None)
            token.fail(f"modbus device {endpoint.name} refused the write (exception {code})")
            return
        token.release()
        words, why = await self._read(
            line, endpoint, "holding", request.address, len(request.words)
        )
        self._written(endpoint, request.command, True, words, why)

    def _written(
        self,
        endpoint: ModbusEndpoint,
        command: str,
        acknowledged: bool,
        words: list[int] | None,
        why: str,
    ) -> None:
        at_ms = int(time.time() * 1000)
        result = WriteResult(
            command=command,
            ok=acknowledged,
            words=words,
            error=None if words is not None else why,
        )
        self._store(endpoint.name, write_result(at_ms, result))

    # Shutdown ---------------------------------------------------------------------------

    async def settle(self, timeout: float) -> None:
        """Writes already taken finish, queued and under way (their records and results
        matter, and their sets are acknowledged only then)."""
        deadline = time.monotonic() + timeout
        while (self._writing or any(line.writes for line in self.lines)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        # Hand over what waits (the write results just stored among it) before the last
        # flush, so the records say how the writes ended; what is left stays in the
        # outbox for the next run.
        outbox = self.outbox
        if outbox is None:
            return
        self.consuming = True
        self._wake.set()
        try:
            while time.monotonic() < deadline and outbox.after(self._cursor, 1):
                await asyncio.sleep(0.01)
        except sqlite3.Error:
            pass
        finally:
            self.consuming = False

    async def close(self) -> None:
        self._delete()
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None


def _where(endpoint: ModbusEndpoint) -> str:
    if endpoint.transport == "rtu":
        return f"{endpoint.serial_port} unit {endpoint.unit_id}"
    return f"{endpoint.host}:{endpoint.port} unit {endpoint.unit_id}"


def _oneline(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
