"""Known secret values, and the search for them in whatever energybus printed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus


def forms(secret: str) -> set[str]:
    """The ways a secret could leak in text: as is, base64 (standard, URL-safe, unpadded),
    URL-encoded (as a path part and as a form value), JSON-escaped and hexadecimal."""
    raw = secret.encode()
    encoded = base64.b64encode(raw).decode()
    return {
        secret,
        encoded,
        encoded.rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        raw.hex(),
    }


def leaks(outputs: Mapping[str, str], secrets: Mapping[str, str]) -> list[str]:
    """``where: which secret, in which form`` for every secret found in an output."""
    return [
        f"{where}: {name} as {form!r}"
        for where, text in outputs.items()
        for name, secret in secrets.items()
        for form in sorted(forms(secret))
        if form in text
    ]


def assert_no_secret(outputs: Mapping[str, str], secrets: Mapping[str, str]) -> None:
    assert all(len(s) >= 12 for s in secrets.values()), "a short secret could match by chance"
    assert sum(len(t) for t in outputs.values()) > 0, "nothing was searched"
    found = leaks(outputs, secrets)
    assert not found, "secrets printed:\n" + "\n".join(found)


def no_traceback(outputs: Iterable[str]) -> None:
    for text in outputs:
        assert "Traceback (most recent call last)" not in text, text
