"""HMAC-SHA256 signatures over a canonical JSON form, and the replay window.

The signed bytes are the message without its ``sig`` field, in the JSON
Canonicalization Scheme (RFC 8785): keys sorted, no whitespace, UTF-8, strings escaped
minimally, numbers written as ECMAScript writes them (``1.0`` is ``1``, ``1e-7`` stays
``1e-7``, ``1e21`` is ``1e+21``). That is what a plant's firmware or a Node.js service gets
from a sorted ``JSON.stringify``, so both ends derive the same bytes from the same
values, whatever whitespace or key order travelled on the wire.

Several secrets may be active at once (key rotation): a message verifies if any of them
signed it; new messages are signed with the first. Comparison is constant-time, and no
function here ever puts a secret or a payload value into an error or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from energybus.errors import SourceError

__all__ = ["ReplayGuard", "Signer", "canonical", "es_number"]

_encode: Final = msgspec.json.Encoder(order="sorted").encode
_INT_LIMIT: Final = 2.0**53


def es_number(value: float) -> str:
    """``value`` as ECMAScript's Number::toString writes it (RFC 8785 §3.2.2.3)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("JSON has no NaN or infinity")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    text = repr(abs(value))  # the shortest digits that round-trip, as ECMAScript uses
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # value = 0.<digits> x 10^n
    n = len(whole) + (int(exponent) if exponent else 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        e = n - 1
        mark = "+" if e >= 0 else "-"
        head = digits if k == 1 else digits[0] + "." + digits[1:]
        body = f"{head}e{mark}{abs(e)}"
    return sign + body


def _jcs_numbers(value: Any) -> Any:
    """``value`` with every float that msgspec would write differently made exact."""
    kind = type(value)
    if kind is float:
        if value.is_integer():
            if -_INT_LIMIT < value < _INT_LIMIT:
                return int(value)  # ``1.0`` -> ``1``, as ECMAScript writes it
        elif abs(value) >= 1e-5:
            return value  # msgspec writes these exactly as ECMAScript does
        return msgspec.Raw(es_number(value).encode())
    if kind is dict:
        return {key: _jcs_numbers(item) for key, item in value.items()}
    if kind is list:
        return [_jcs_numbers(item) for item in value]
    return value


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes that are signed: ``message`` without ``sig``, in RFC 8785 form."""
    body = {key: value for key, value in message.items() if key != "sig"}
    return _encode(_jcs_numbers(body))


class Signer:
    """Signs with the first of ``secrets`` and verifies against all of them."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if not keys or any(not key for key in keys):
            raise ValueError("a signer needs at least one non-empty secret")
        self._keys = keys

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} secret(s))"  # never the secrets themselves

    def sign(self, message: dict[str, Any]) -> str:
        return hmac.new(self._keys[0], canonical(message), hashlib.sha256).hexdigest()

    def verify(self, message: dict[str, Any]) -> None:
        """Raise :class:`SourceError` unless ``message["sig"]`` is a valid signature."""
        sig = message.get("sig")
        if sig is None:
            raise SourceError("missing_signature", "message has no sig field", path="$.sig")
        if type(sig) is not str:
            raise SourceError("bad_signature", "sig must be a hex string", path="$.sig")
        body = canonical(message)
        given = sig.lower().encode("ascii", "replace")
        valid = False
        for key in self._keys:
            # Every key is tried, so timing does not tell which one matched.
            expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
            valid |= hmac.compare_digest(expected, given)
        if not valid:
            raise SourceError(
                "bad_signature", "signature does not match any active secret", path="$.sig"
            )


class ReplayGuard:
    """Refuses messages outside the time window and repeats of a key inside it.

    A key (a signature, a command id) is remembered for twice the window, since a
    message ``window`` early and its copy ``window`` late are both in time; or for
    ``keep_s`` when given. ``max_keys`` bounds the memory: past it the oldest keys are
    forgotten first.
    """

    def __init__(
        self, *, window_s: float, keep_s: float | None = None, max_keys: int | None = None
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, not {window_s!r}")
        self.window = timedelta(seconds=window_s)
        self._window_ms = window_s * 1000
        self._keep = timedelta(seconds=keep_s) if keep_s is not None else 2 * self.window
        self._max_keys = max_keys
        self._seen: dict[str, datetime] = {}
        self._order: deque[tuple[datetime, str]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def check_time(self, ts_ms: float, received_at: datetime) -> None:
        """Raise ``expired`` unless ``ts_ms`` (Unix ms) is within the window of receipt."""
        offset = ts_ms - received_at.timestamp() * 1000
        if abs(offset) > self._window_ms:
            side = "ahead of" if offset > 0 else "behind"
            raise SourceError(
                "expired",
                f"ts is {abs(offset) / 1000:.0f} s {side} the receive time; "
                f"the replay window is ±{self.window.total_seconds():g} s",
                path="$.ts",
            )

    def check_and_remember(self, key: str, received_at: datetime, what: str) -> None:
        self._prune(received_at)
        if key in self._seen:
            raise SourceError("replayed", f"{what} was already seen inside the replay window")
        self._seen[key] = received_at
        self._order.append((received_at, key))
        if self._max_keys is not None and len(self._order) > self._max_keys:
            self._seen.pop(self._order.popleft()[1], None)

    def _prune(self, now: datetime) -> None:
        horizon = now - self._keep
        order = self._order
        while order and order[0][0] < horizon:
            _, key = order.popleft()
            self._seen.pop(key, None)
