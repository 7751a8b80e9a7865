"""Asking a SunSpec device what it holds: the marker, then the chain of models.

A register map for a SunSpec device depends on where that device put its models, so
before a map exists someone has to ask the device (``energybus modbus scan``). The walk
is pysunspec2's (``SunSpecModbusClientDevice.scan``): the marker ``SunS`` at 40000, 0
or 50000; then from two registers after it, each model's ID and length L, the next model
L + 2 registers further on, until the ID 0xFFFF. The length is read apart from the ID
because some devices give no length after the end marker.

Every failure a user can meet (nothing listening, no answer, no marker, a chain that
makes no sense) is a :class:`ScanError` with a one-line message; pymodbus's own
exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, replace
from typing import Final

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from energybus.adapters.sunspec import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    MARKER,
    MAX_MODELS,
    FoundModel,
    decode_string,
)

__all__ = ["ScanError", "ScanResult", "endpoint", "scan"]

_EXCEPTIONS: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target did not respond",
}
_COMMON_ID: Final = 1
_COMMON_TEXT: Final = 64
"""Registers of model 1's strings (Mn, Md, Opt, Vr, SN), from offset 2."""


class ScanError(Exception):
    """A scan that could not finish; ``str(error)`` is one line for the user."""


@dataclass(frozen=True)
class ScanResult:
    """What a scan found: the marker's address and the models in chain order, with the
    common model's identity (``None`` when the device has no model 1)."""

    host: str
    port: int
    unit: int
    base: int
    models: list[FoundModel]
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    version: str | None = None


def endpoint(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def scan(host: str, port: int = 502, *, unit: int = 1, timeout: float = 2.0) -> ScanResult:
    """Find the SunSpec marker and walk the model chain of the device ``unit`` at
    ``host:port``, waiting ``timeout`` seconds for the connection and for each answer."""
    where = endpoint(host, port)
    # No retries: an address that does not answer is "no marker here", and a person is
    # waiting. No reconnect delay: nothing should keep trying once the scan is over.
    client = AsyncModbusTcpClient(host, port=port, timeout=timeout, retries=0, reconnect_delay=0)
    try:
        if not await client.connect():
            reason = await _unreachable(host, port, timeout)
            raise ScanError(f"cannot connect to {where}: {reason}")
        reader = _Reader(client, unit, timeout)
        base = await _find_base(reader, where)
        models = await _walk(reader, base)
        result = ScanResult(host, port, unit, base, models)
        common = next((m for m in models if m.model_id == _COMMON_ID), None)
        if common is None:
            return result
        words = await reader.must(
            common.address + 2,
            min(_COMMON_TEXT, common.length),
            f"the common model (1) at {common.address}",
        )
        return replace(
            result,
            manufacturer=decode_string(words[0:16]),
            model=decode_string(words[16:32]),
            version=decode_string(words[40:48]),
            serial=decode_string(words[48:64]),
        )
    finally:
        client.close()


class _Reader:
    """Holding-register reads that give either the registers or why not, in words."""

    def __init__(self, client: AsyncModbusTcpClient, unit: int, timeout: float) -> None:
        self.client = client
        self.unit = unit
        self.timeout = timeout

    async def read(self, address: int, count: int) -> list[int] | str:
        if count == 0:
            return []
        try:
            response = await self.client.read_holding_registers(
                address, count=count, device_id=self.unit
            )
        except ConnectionException:
            return "the connection was lost"
        except ModbusIOException:
            return f"no answer within {self.timeout:g} s"
        except (ModbusException, OSError) as error:
            return " ".join(str(error).split()) or type(error).__name__
        if response.isError():
            code = getattr(response, "exception_code", 0)
            return f"exception {code} ({_EXCEPTIONS.get(code, 'unknown')})"
        registers = list(response.registers)
        if len(registers) != count:
            return f"answered {len(registers)} registers, not {count}"
        return registers

    async def must(self, address: int, count: int, what: str) -> list[int]:
        words = await self.read(address, count)
        if isinstance(words, str):
            raise ScanError(f"reading {what} failed: {words}")
        return words


async def _find_base(reader: _Reader, where: str) -> int:
    tried: list[str] = []
    for base in BASE_ADDRESSES:
        words = await reader.read(base, 2)
        if isinstance(words, str):
            tried.append(f"{base}: {words}")
        elif tuple(words) == MARKER:
            return base
        else:
            tried.append(f"{base}: {words[0]:#06x} {words[1]:#06x}")
    raise ScanError(
        f"no SunSpec marker 'SunS' at {where} unit {reader.unit} (addresses {'; '.join(tried)})"
    )


async def _walk(reader: _Reader, base: int) -> list[FoundModel]:
    models: list[FoundModel] = []
    address = base + 2
    while True:
        if address > 0xFFFF:
            raise ScanError(
                f"the model chain from {base} runs past address 65535 without an end marker"
            )
        (model_id,) = await reader.must(address, 1, f"the model ID at {address}")
        if model_id == END_MODEL_ID:
            return models
        if len(models) == MAX_MODELS:
            raise ScanError(
                f"the model chain from {base} has more than {MAX_MODELS} models and no"
                " end marker (0xFFFF): not a SunSpec chain"
            )
        if address + 1 > 0xFFFF:
            raise ScanError(f"model {model_id} at {address} has no room for its length")
        (length,) = await reader.must(address + 1, 1, f"the length of model {model_id}")
        if address + length + 1 > 0xFFFF:
            raise ScanError(
                f"model {model_id} at {address} has length {length}, which runs past address 65535"
            )
        models.append(FoundModel(model_id, address, length))
        address += length + 2


async def _unreachable(host: str, port: int, timeout: float) -> str:
    """Why the connection failed: pymodbus only says that it did, so try once more."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror:
        return f"unknown host {host!r}"
    except OSError as error:
        return error.strerror or type(error).__name__
    writer.close()
    return "the connection failed (it works now: try again)"
