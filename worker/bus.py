"""The worker's MQTT 5 client, for both of its connections, built for the hot path.

Why not paho under aiomqtt: measured here, paho's ``publish`` at QoS 1 moves about
23,000 messages/s at best (one socketpair wake-up and one ``send`` per message, several
objects per message), while one VEN message becomes about 100 QoS 1 publishes; and on
the receiving side paho builds a ``Properties`` object per PUBLISH and a message-info
object with a ``threading.Condition`` per acknowledgement (a quarter of the worker's CPU
at 1,500 VEN messages/s, docs/worker.md). This client encodes PUBLISH packets into one
buffer for many messages and hands it to the transport in one write, tracks packet ids
in a flat table, parses received PUBLISH packets from the buffer they arrived in, and
lets the caller acknowledge received messages itself. It speaks just what the worker
needs: CONNECT (clean start, session expiry, receive maximum, will), SUBSCRIBE with
No Local, Retain As Published and Retain Handling, PUBLISH and PUBACK both ways (with
one fixed set of properties on every PUBLISH it sends, and the raw properties of every
one it receives), PINGREQ, DISCONNECT. QoS 2 is never requested, so never received.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "REASONS",
    "BusClient",
    "BusError",
    "Received",
    "reason_text",
    "tls_text",
    "user_property",
]

_CONNECT: Final = 0x10
_CONNACK: Final = 0x20
_PUBLISH: Final = 0x30
_PUBACK: Final = 0x40
_SUBSCRIBE: Final = 0x82
_SUBACK: Final = 0x90
_PINGREQ: Final = b"\xc0\x00"
_PINGRESP: Final = 0xD0
_DISCONNECT: Final = 0xE0
MAX_PACKET_ID: Final = 65535
_FLUSH_PIECES: Final = 8000  # about 1,600 publishes, some 240 kB of VEN output
_FLUSH_DELAY_S: Final = 0.005


REASONS: Final = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}
"""MQTT 5 failure reason codes (section 2.4) in the words of the specification, for
messages people read; metrics keep the code."""


def reason_text(code: int) -> str:
    """``0x87 not authorized``: the code, and its name when it has one."""
    name = REASONS.get(code)
    return f"0x{code:02x} {name}" if name else f"0x{code:02x}"


def tls_text(error: ssl.SSLError) -> str:
    """A TLS failure in a line: the certificate check's own words when the check failed
    (``certificate has expired``, ``unable to get local issuer certificate``), else what
    the other side's alert or OpenSSL said, without OpenSSL's source location."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"TLS: the broker's certificate was refused: {error.verify_message}"
    reason = getattr(error, "reason", None)
    if reason:
        words = str(reason).lower().replace("_", " ")
        if "alert" in words:
            return f"TLS: the other side refused the handshake ({words})"
        return f"TLS: {words}"
    return f"TLS: {error.strerror or error}"


class BusError(Exception):
    """The bus connection failed or was refused; ``reason`` is the MQTT reason code if any."""

    def __init__(self, message: str, *, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


_LENGTHS: Final = [_varint(n) for n in range(16384)]
_HEADS: Final = [b"\x32" + length for length in _LENGTHS]
"""Fixed headers of QoS 1 PUBLISH packets by remaining length (retain off, then on)."""
_HEADS_RETAIN: Final = [b"\x33" + length for length in _LENGTHS]
_PACKET_IDS: Final = [n.to_bytes(2, "big") for n in range(MAX_PACKET_ID + 1)]


def user_property(name: str, value: str) -> bytes:
    """An MQTT 5 User Property (0x26) as it appears among a PUBLISH's properties."""
    return b"\x26" + _string(name.encode()) + _string(value.encode())


class Received:
    """An incoming PUBLISH; ``packet_id`` is 0 for QoS 0; ``properties`` are its MQTT 5
    properties as they came (without their length), usually none. ``dup`` marks the
    broker's redelivery of a QoS 1 message it sent before, under the same packet id."""

    __slots__ = ("dup", "packet_id", "payload", "properties", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int,
        properties: bytes = b"",
        dup: bool = False,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.packet_id = packet_id
        self.properties = properties
        self.dup = dup


class BusClient(asyncio.Protocol):
    """One MQTT 5 connection. Build, then ``await connect(...)``.

    ``on_message(received)`` runs for each incoming PUBLISH (the caller acknowledges a
    QoS 1 one with :meth:`ack`); ``on_puback(token)`` runs when the broker acknowledges
    a QoS 1 publish made with that token, and ``on_refused(topic, reason)`` too when the
    broker refused it (reason >= 0x80): the refusal is final, nothing is resent.
    ``closed`` completes when the connection ends. ``properties`` (encoded properties,
    such as :func:`user_property`) go with every PUBLISH this client sends.
    """

    def __init__(
        self,
        *,
        on_message: Callable[[Received], None],
        on_puback: Callable[[Any, int], None],
        on_refused: Callable[[str, int], None] | None = None,
        max_inflight: int = 20000,
        properties: bytes = b"",
    ) -> None:
        if not 0 < max_inflight < MAX_PACKET_ID:
            raise ValueError(f"max_inflight must be in 1..{MAX_PACKET_ID - 1}")
        self.on_message = on_message
        self.on_puback = on_puback
        self.on_refused = on_refused
        self.max_inflight = max_inflight
        self._properties = _varint(len(properties)) + properties
        self.inflight = 0
        self.session_present = False
        self._tokens: list[Any] = [None] * (MAX_PACKET_ID + 1)
        self._sent: list[tuple[str, bytes, bool] | None] = [None] * (MAX_PACKET_ID + 1)
        self._flush_soon = False
        self._busy = bytearray(MAX_PACKET_ID + 1)
        self._next_id = 1
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._topics: dict[str, bytes] = {}
        self._connack: asyncio.Future[tuple[bool, int, bytes]] | None = None
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._alive = True
        self._ping_task: asyncio.Task[None] | None = None
        self._heard = 0.0
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )

    # Connection -------------------------------------------------------------------------

    async def connect(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        clean_start: bool = False,
        session_expiry: int = 0,
        receive_maximum: int = 65535,
        will: tuple[str, bytes, int, bool] | None = None,
        timeout: float = 10.0,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, host, port, ssl=tls), timeout=timeout
            )
        except ssl.SSLError as error:
            raise BusError(tls_text(error)) from None
        flags = 0x02 if clean_start else 0
        props = b"\x11" + session_expiry.to_bytes(4, "big")
        props += b"\x21" + min(receive_maximum, 65535).to_bytes(2, "big")
        body = _string(client_id.encode())
        if will is not None:
            topic, payload, qos, retain = will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            body += b"\x00" + _string(topic.encode()) + _string(payload)
        if username is not None:
            flags |= 0x80
            body += _string(username.encode())
        if password is not None:
            flags |= 0x40
            body += _string(password.encode())
        variable = _string(b"MQTT") + bytes([5, flags]) + keepalive.to_bytes(2, "big")
        variable += _varint(len(props)) + props
        self._send_packet(_CONNECT, variable + body)
        try:
            present, reason, _ = await asyncio.wait_for(self._connack, timeout=timeout)
        except BusError as error:
            self.abort()
            if tls is None:  # a broker that takes TLS only drops a plain CONNECT so
                raise BusError(f"{error} (a port that takes TLS only? configure TLS)") from None
            if "TLS:" not in str(error):
                # With TLS 1.3 the broker's alert about the client's certificate may be
                # lost to the reset that follows it: say what it most likely was.
                raise BusError(
                    f"{error} (the broker closed the TLS connection before answering:"
                    " does it want a client certificate, or another one?)"
                ) from None
            raise
        except BaseException:
            self.abort()
            raise
        if reason >= 0x80:
            self.abort()
            raise BusError(f"broker refused the connection: {reason_text(reason)}", reason=reason)
        self.session_present = present
        if keepalive:
            self._ping_task = loop.create_task(self._ping(keepalive))

    async def subscribe(
        self,
        filters: list[str],
        *,
        no_local: bool = True,
        retain_as_published: bool = False,
        retain_handling: int = 0,
    ) -> None:
        """Subscribe at QoS 1 with MQTT 5's subscription options; raises
        :class:`BusError` when the broker refuses a filter."""
        if not filters:
            return
        packet_id = self._take_id(None)
        options = (
            0x01
            | (0x04 if no_local else 0)
            | (0x08 if retain_as_published else 0)
            | (retain_handling & 0x03) << 4
        )
        body = packet_id.to_bytes(2, "big") + b"\x00"
        for topic_filter in filters:
            body += _string(topic_filter.encode()) + bytes([options])
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = future
        self._send_packet(_SUBSCRIBE, body)
        codes = await asyncio.wait_for(future, timeout=10)
        refused = [
            f"{f} ({reason_text(code)})"
            for f, code in zip(filters, codes, strict=False)
            if code >= 0x80
        ]
        if refused:
            first = next(code for code in codes if code >= 0x80)
            raise BusError(f"broker refused subscriptions: {', '.join(refused)}", reason=first)

    async def disconnect(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.flush()
            self._transport.write(bytes([_DISCONNECT, 0]))
            self._transport.close()
        await asyncio.shield(self.closed)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        """Read nothing more until :meth:`resume_reading`: the broker's sends back up in
        TCP. The keep-alive check waits too (the broker is not silent, just unread)."""
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_reading():
            self._heard = asyncio.get_running_loop().time()
            self._transport.resume_reading()

    # Publishing -------------------------------------------------------------------------

    @property
    def room(self) -> bool:
        """Whether another QoS 1 publish fits under ``max_inflight``."""
        return self.inflight < self.max_inflight

    async def wait_room(self) -> None:
        """Until a publish fits; raises :class:`BusError` once the connection is gone
        (never waits on a dead connection)."""
        while self.inflight >= self.max_inflight:
            if not self._alive:
                raise BusError("bus connection lost")
            self._room.clear()
            await self._room.wait()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, token: Any) -> None:
        """Queue a PUBLISH; it leaves with the next :meth:`flush`. Never blocks: the caller
        keeps ``inflight`` under ``max_inflight`` with :meth:`wait_room`."""
        encoded = self._topics.get(topic)
        if encoded is None:
            if len(self._topics) > 200_000:
                self._topics.clear()
            encoded = self._topics[topic] = _string(topic.encode())
        if qos:
            # _take_id inline, and the fixed header and packet id from tables: this runs
            # for every sample's value and last.
            busy = self._busy
            packet_id = self._next_id
            while busy[packet_id]:
                packet_id = packet_id + 1 if packet_id < MAX_PACKET_ID else 1
            busy[packet_id] = 1
            self._tokens[packet_id] = token
            self._next_id = packet_id + 1 if packet_id < MAX_PACKET_ID else 1
            self._sent[packet_id] = (topic, payload, retain)
            self.inflight += 1
            properties = self._properties
            length = len(encoded) + 2 + len(properties) + len(payload)
            if length < 16384:
                head = (_HEADS_RETAIN if retain else _HEADS)[length]
            else:
                head = bytes((0x32 | retain,)) + _varint(length)
            self._out += (head, encoded, _PACKET_IDS[packet_id], properties, payload)
        else:
            length = len(encoded) + len(self._properties) + len(payload)
            head = bytes((0x30 | retain,)) + (
                _LENGTHS[length] if length < 16384 else _varint(length)
            )
            self._out += (head, encoded, self._properties, payload)

    def ack(self, packet_id: int) -> None:
        """Acknowledge a received QoS 1 message; acks of one loop iteration leave together."""
        self._out.append(b"\x40\x02" + packet_id.to_bytes(2, "big"))
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def resend(self, previous: BusClient) -> int:
        """Publish again what ``previous`` sent without getting its PUBACK, oldest first,
        with the same tokens; returns how many. MQTT 5 asks for exactly this after a
        reconnect, and the broker may deliver such a message twice (QoS 1)."""
        count = 0
        start = previous._next_id
        for offset in range(MAX_PACKET_ID):
            packet_id = (start + offset - 1) % MAX_PACKET_ID + 1
            sent = previous._sent[packet_id]
            if previous._busy[packet_id] and sent is not None:
                topic, payload, retain = sent
                self.publish(topic, payload, 1, retain, previous._tokens[packet_id])
                count += 1
        previous._busy[:] = bytes(len(previous._busy))
        previous.inflight = 0
        self.flush()
        return count

    def flush(self) -> None:
        self._flush_soon = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def flush_soon(self) -> None:
        """Flush within ``_FLUSH_DELAY_S``, or now once ``_FLUSH_PIECES`` pieces are queued.

        Measured here (a 2-core VM, broker on loopback), one write costs about 100 µs
        whatever its size up to tens of kB: mostly waking the broker, not copying bytes.
        One write per source message was a quarter of the worker's CPU at 1,000 VEN
        messages/s; writing every 5 ms instead puts several messages in one write. The
        size bound keeps a burst from waiting for its end.
        """
        if len(self._out) >= _FLUSH_PIECES:
            self.flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_later(_FLUSH_DELAY_S, self.flush)

    def _take_id(self, token: Any) -> int:
        busy = self._busy
        packet_id = self._next_id
        while busy[packet_id]:
            packet_id = packet_id + 1 if packet_id < MAX_PACKET_ID else 1
        busy[packet_id] = 1
        self._tokens[packet_id] = token
        self._next_id = packet_id + 1 if packet_id < MAX_PACKET_ID else 1
        return packet_id

    # Protocol ---------------------------------------------------------------------------

    def _send_packet(self, kind: int, body: bytes) -> None:
        assert self._transport is not None
        self._transport.write(bytes([kind]) + _varint(len(body)) + body)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._alive = False
        self._room.set()
        if self._ping_task is not None:
            self._ping_task.cancel()
        # With TLS 1.3 a client certificate the broker refuses is known only here: the
        # handshake is complete for the client before the broker has checked it.
        error = tls_text(exc) if isinstance(exc, ssl.SSLError) else exc or "closed"
        for future in (self._connack, *self._subacks.values()):
            if future is not None and not future.done():
                future.set_exception(BusError(f"bus connection lost: {error}"))
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        buffer = self._buffer
        buffer += data
        view = buffer  # indexed, never exported: it is resized below
        pos = 0
        end = len(buffer)
        tokens = self._tokens
        busy = self._busy
        on_puback = self.on_puback
        acked = 0
        try:
            while end - pos >= 2:
                kind = view[pos]
                if kind == _PUBACK and view[pos + 1] == 2 and end - pos >= 4:
                    # A PUBACK with no reason code: success, the bulk of what arrives.
                    packet_id = (view[pos + 2] << 8) | view[pos + 3]
                    pos += 4
                    if busy[packet_id]:
                        busy[packet_id] = 0
                        acked += 1
                        token = tokens[packet_id]
                        if token is not None:
                            tokens[packet_id] = None
                            on_puback(token, 0)
                    continue
                # Remaining length: 1 to 4 bytes.
                length = 0
                shift = 0
                index = pos + 1
                while True:
                    if index >= end:
                        return
                    byte = view[index]
                    length |= (byte & 0x7F) << shift
                    index += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise BusError("malformed remaining length")
                if index + length > end:
                    return
                start = index
                pos = index + length
                high = kind & 0xF0
                if high == _PUBACK:
                    packet_id = (view[start] << 8) | view[start + 1]
                    if busy[packet_id]:
                        busy[packet_id] = 0
                        token = tokens[packet_id]
                        tokens[packet_id] = None
                        acked += 1
                        reason = view[start + 2] if length > 2 else 0
                        if reason >= 0x80 and self.on_refused is not None:
                            sent = self._sent[packet_id]
                            self.on_refused(sent[0] if sent else "", reason)
                        on_puback(token, reason)
                elif high == _PUBLISH:
                    self._publish_received(kind, view[start:pos])
                elif high == _CONNACK:
                    if self._connack is not None and not self._connack.done():
                        self._connack.set_result(
                            (bool(view[start] & 1), view[start + 1], bytes(view[start + 2 : pos]))
                        )
                elif high == _SUBACK:
                    packet_id = (view[start] << 8) | view[start + 1]
                    busy[packet_id] = 0
                    props, at = self._varint_at(view, start + 2)
                    future = self._subacks.pop(packet_id, None)
                    if future is not None and not future.done():
                        future.set_result(bytes(view[at + props : pos]))
                elif high == _DISCONNECT:
                    reason = view[start] if length else 0
                    raise BusError(f"broker disconnected: {reason_text(reason)}", reason=reason)
                # PINGRESP and anything else: nothing to do.
        except BusError as error:
            self.connection_lost(error)
            self.abort()
        finally:
            del buffer[:pos]
            if acked:
                self.inflight -= acked
                if not self._room.is_set() and self.inflight < self.max_inflight // 2:
                    self._room.set()
            self.flush()

    @staticmethod
    def _varint_at(view: bytearray | bytes, at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = view[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, at
            shift += 7

    def _publish_received(self, kind: int, body: bytearray) -> None:
        qos = (kind >> 1) & 0x03
        topic_length = (body[0] << 8) | body[1]
        at = 2 + topic_length
        topic = bytes(body[2:at]).decode("utf-8", "replace")
        packet_id = 0
        if qos:
            packet_id = (body[at] << 8) | body[at + 1]
            at += 2
        props, at = self._varint_at(body, at)
        properties = bytes(body[at : at + props]) if props else b""
        payload = bytes(body[at + props :])
        self.on_message(
            Received(topic, payload, qos, bool(kind & 1), packet_id, properties, bool(kind & 8))
        )

    async def _ping(self, keepalive: int) -> None:
        """PINGREQ every half keep-alive; a broker silent for 1.5 keep-alives is gone
        (a dead peer need not reset the TCP connection)."""
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        while self._alive and self._transport is not None:
            await asyncio.sleep(keepalive / 2)
            reading = self._transport.is_reading() if self._transport is not None else False
            if not reading:
                self._heard = loop.time()
            elif loop.time() - self._heard > keepalive * 1.5:
                self.connection_lost(BusError("broker silent past the keep-alive"))
                self.abort()
                return
            self._transport.write(_PINGREQ)
