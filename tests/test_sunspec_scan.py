"""The SunSpec scan against a real pymodbus server, the register map it writes, and the
``energybus modbus scan`` command.

The server runs on an event loop of its own in a thread, so that a test (and the CLI,
which calls ``asyncio.run``) can drive the client from the main thread as a user would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from energybus.adapters.modbus import ModbusAdapter
from energybus.adapters.registers import REGISTER_TYPES
from energybus.adapters.sunspec import (
    MODELS,
    FoundModel,
    decode_string,
    device_map,
    model_name,
)
from energybus.cli.mappings import mappings
from energybus.cli.modbus import modbus
from energybus.worker.sunspec import ScanError, ScanResult, scan
from tools.services import free_port

MARKER = [0x5375, 0x6E53]
END = [0xFFFF, 0]


def text(value: str, registers: int) -> list[int]:
    raw = value.encode().ljust(2 * registers, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def block(model_id: int, length: int, body: list[int] | None = None) -> list[int]:
    body = body or []
    return [model_id, length, *body, *[0] * (length - len(body))]


def common() -> list[int]:
    strings = (
        text("energybus", 16)
        + text("sim-battery", 16)
        + text("", 8)
        + text("0.1", 8)
        + text("SIM-0001", 16)
    )
    return block(1, 66, [*strings, 1, 0])


def chain() -> list[int]:
    """Marker, models 1, 103, 120, 124 and 802, end: 242 registers."""
    return [
        *MARKER,
        *common(),
        *block(103, 50),
        *block(120, 26),
        *block(124, 24),
        *block(802, 62),
        *END,
    ]


EXPECTED = [
    FoundModel(1, 40002, 66),
    FoundModel(103, 40070, 50),
    FoundModel(120, 40122, 26),
    FoundModel(124, 40150, 24),
    FoundModel(802, 40176, 62),
]


@contextmanager
def serving(blocks: dict[int, list[int]]) -> Iterator[int]:
    """A pymodbus server on 127.0.0.1 holding ``{address: registers}`` (every other
    address undefined, so reading it is an exception response); yields its port."""
    device = SimDevice(
        id=1,
        simdata=[
            SimData(address, values=words, datatype=DataType.REGISTERS)
            for address, words in sorted(blocks.items())
        ],
    )

    async def start() -> ModbusTcpServer:
        # The server takes the running loop when it is made.
        server = ModbusTcpServer(context=device, address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        return server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server: ModbusTcpServer | None = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        listener = cast("asyncio.Server", server.transport)
        port: int = listener.sockets[0].getsockname()[1]
        yield port
    finally:
        if server is not None:
            stop = server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus: unannotated
            asyncio.run_coroutine_threadsafe(stop, loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run_scan(port: int, timeout: float = 2.0) -> ScanResult:
    return asyncio.run(scan("127.0.0.1", port, unit=1, timeout=timeout))


def scan_error(port: int, timeout: float = 2.0) -> str:
    with pytest.raises(ScanError) as caught:
        run_scan(port, timeout)
    message = str(caught.value)
    assert "\n" not in message
    return message


# The scan --------------------------------------------------------------------------------


def test_scan_finds_the_marker_at_40000_and_every_model_in_order() -> None:
    with serving({40000: chain()}) as port:
        result = run_scan(port)
    assert result.base == 40000
    assert result.models == EXPECTED
    assert (result.manufacturer, result.model, result.serial) == (
        "energybus",
        "sim-battery",
        "SIM-0001",
    )
    assert result.version == "0.1"


def test_scan_finds_the_marker_at_0() -> None:
    with serving({0: chain()}) as port:
        result = run_scan(port)
    assert result.base == 0
    assert result.models == [m._replace(address=m.address - 40000) for m in EXPECTED]
    assert result.manufacturer == "energybus"


def test_no_marker_anywhere_is_one_clear_line() -> None:
    with serving({40000: [0] * 8}) as port:
        message = scan_error(port)
    assert message.startswith(f"no SunSpec marker 'SunS' at 127.0.0.1:{port} unit 1")
    assert "40000: 0x0000 0x0000" in message
    assert "0: exception 2 (illegal data address)" in message
    assert "50000: exception 2" in message


def test_a_closed_port_is_one_clear_line() -> None:
    port = free_port()
    assert scan_error(port) == f"cannot connect to 127.0.0.1:{port}: connection refused"


def test_a_device_that_never_answers_is_no_marker() -> None:
    with socket.socket() as sock:  # accepts connections (the kernel does), answers nothing
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        message = scan_error(sock.getsockname()[1], timeout=0.2)
    assert message.startswith("no SunSpec marker")
    assert message.count("no answer within 0.2 s") == 3


def test_a_chain_without_end_stops_after_100_models() -> None:
    with serving({0: [*MARKER, *block(64000, 0) * 101, *END]}) as port:
        message = scan_error(port)
    assert "more than 100 models" in message


def test_a_chain_past_65535_is_refused() -> None:
    with serving({50000: [*MARKER, *block(64000, 20000)[:2]]}) as port:
        message = scan_error(port)
    assert message == "model 64000 at 50002 has length 20000, which runs past address 65535"


def test_a_chain_into_undefined_registers_is_refused() -> None:
    with serving({40000: [*MARKER, *block(103, 50)]}) as port:  # no end marker
        message = scan_error(port)
    assert message == "reading the model ID at 40054 failed: exception 2 (illegal data address)"


# The register map ------------------------------------------------------------------------


def test_the_model_tables_are_consistent() -> None:
    for model in MODELS.values():
        offset = 0
        names: set[str] = set()
        for point in model.points:
            assert point.offset == offset, (model.id, point.name)
            if point.type in ("string", "pad"):
                assert point.metric is None
            else:
                assert REGISTER_TYPES[point.type].words == point.size, (model.id, point.name)
            if point.sf is not None:
                assert any(p.name == point.sf and p.type == "sunssf" for p in model.points)
            assert point.name.lower() not in names  # register names stay unique
            names.add(point.name.lower())
            offset += point.size
        assert offset == model.length + 2, model.id
    assert model_name(103) == "inverter_three_phase"
    assert model_name(160) is None


def write_map(tmp_path: Path, models: list[FoundModel], entity_type: str = "storage") -> Path:
    path = tmp_path / "sim-battery.toml"
    path.write_text(device_map(models, name="sim-battery", unit_id=3, entity_type=entity_type))
    return path


def test_the_map_of_the_scan_passes_the_mapping_check(tmp_path: Path) -> None:
    with serving({40000: chain()}) as port:
        result = run_scan(port)
    path = write_map(tmp_path, result.models)
    plan = ModbusAdapter.check_mapping(path)
    assert plan.rows == 17
    checked = CliRunner().invoke(mappings, ["check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert checked.output.startswith("ok ")

    data: dict[str, Any] = tomllib.loads(path.read_text())
    assert data["adapter"] == "modbus"
    assert data["device"] == {
        "entity_type": "storage",
        "unit_id": 3,
        "table": "holding",
        "max_registers": 125,
    }
    registers = data["registers"]
    assert registers["m103_w"]["address"] == 40084
    assert registers["m103_w"]["scale_register"] == "m103_w_sf"
    assert registers["m103_w_sf"] == {
        "address": 40085,
        "doc_address": "103:W_SF (offset 15)",
        "data_type": "sunssf",
        "description": "Scale factor (SunSpec 103 W_SF)",
    }
    assert registers["m103_pf"]["scale"] == 0.01
    assert registers["m103_tmpcab"]["unit"] == "degC"
    # Writable on the device, read only in the map until someone gives it limits.
    assert "writable" not in registers["m124_wchamax"]
    assert "add writable = true and limits" in registers["m124_wchamax"]["description"]
    assert registers["m124_wchamax"]["address"] == 40152
    assert registers["m802_soc"]["metric"] == "soc"
    # A metric once per map: 802's SoC is mandatory, 124's ChaState optional (a device
    # may leave it unimplemented), so ChaState is left out though 124 comes first.
    assert "m124_chastate" not in registers
    assert "m802_soc" in data["ignore"]["m124_chastate"]
    assert registers["m802_soh"]["address"] == 40189
    metrics = [r["metric"] for r in registers.values() if "metric" in r]
    assert len(metrics) == len(set(metrics)) == 17
    # Every point is either mapped or ignored with a reason.
    for found in result.models:
        for point in MODELS[found.model_id].points:
            key = f"m{found.model_id}_{point.name.lower()}"
            assert (key in registers) != (key in data["ignore"]), key


def test_a_second_instance_an_unknown_model_and_a_short_model(tmp_path: Path) -> None:
    models = [
        FoundModel(1, 40002, 66),
        FoundModel(160, 40070, 48),
        FoundModel(103, 40120, 20),  # shorter than SunSpec's 50: W_SF at offset 15 is in
        FoundModel(103, 40142, 50),
    ]
    path = write_map(tmp_path, models, entity_type="source")
    ModbusAdapter.check_mapping(path)
    data: dict[str, Any] = tomllib.loads(path.read_text())
    assert "not in energybus's SunSpec tables" in data["ignore"]["m160"]
    assert data["registers"]["m103_w"]["address"] == 40134
    assert "past the end" in data["ignore"]["m103_wh"]
    assert "m103_w" in data["ignore"]["m103_2_w"]


def test_a_map_needs_a_canonical_point() -> None:
    with pytest.raises(ValueError, match="no model found"):
        device_map([FoundModel(1, 40002, 66)], name="x", unit_id=1, entity_type="storage")
    with pytest.raises(ValueError, match="no entity type 'battery'"):
        device_map(EXPECTED, name="x", unit_id=1, entity_type="battery")


def test_decode_string() -> None:
    assert decode_string(text("SIM-0001", 8)) == "SIM-0001"
    assert decode_string(text("abc", 4)) == "abc"
    assert decode_string([0, 0]) == ""
    assert decode_string([0x4142, 0x4300, 0x4445]) == "ABC"  # text ends at the first NUL


# The command -----------------------------------------------------------------------------


def test_the_command_prints_the_models_and_writes_the_map(tmp_path: Path) -> None:
    path = tmp_path / "battery.toml"
    runner = CliRunner()
    with serving({40000: chain()}) as port:
        result = runner.invoke(modbus, ["scan", f"127.0.0.1:{port}", "--write", str(path)])
        assert result.exit_code == 0, result.output
        again = runner.invoke(modbus, ["scan", f"127.0.0.1:{port}", "--write", str(path)])
        forced = runner.invoke(
            modbus, ["scan", f"127.0.0.1:{port}", "--write", str(path), "--force"]
        )
    lines = result.stdout.splitlines()
    assert lines[0] == f"found    SunSpec at 127.0.0.1:{port} unit 1: marker at 40000, 5 models"
    assert lines[1].split() == ["model", "1", "common", "at", "40002", "length", "66"]
    assert lines[2].split() == [
        "model", "103", "inverter_three_phase", "at", "40070", "length", "50"
    ]  # fmt: skip
    assert lines[5].split() == ["model", "802", "battery", "at", "40176", "length", "62"]
    assert lines[6] == (
        "device   manufacturer 'energybus', model 'sim-battery', serial 'SIM-0001', version '0.1'"
    )
    assert lines[7] == (
        "map      sunspec_battery: its SunSpec chain is this device's"
        ' (use map = "sunspec_battery")'
    )
    assert lines[8].startswith(
        f"wrote    {path}: 17 metrics from 29 registers, entity type storage"
    )
    assert result.stderr == ""
    ModbusAdapter.check_mapping(path)
    assert "sim-battery, serial SIM-0001" in path.read_text()

    assert again.exit_code == 1
    assert again.stderr == f"error: {path} exists (--force overwrites it)\n"
    assert forced.exit_code == 0, forced.output


def test_the_command_reports_failures_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    runner = CliRunner()
    result = runner.invoke(modbus, ["scan", f"127.0.0.1:{port}", "--timeout", "1"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"error: cannot connect to 127.0.0.1:{port}: connection refused\n"
    with serving({40000: [0] * 8}) as port:
        result = runner.invoke(modbus, ["scan", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no SunSpec marker 'SunS' at")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    bad = runner.invoke(modbus, ["scan", "127.0.0.1:99999"])
    assert bad.exit_code == 2
    assert "port '99999' is not 1..65535" in bad.output


def test_the_simulator_serves_the_chain_its_map_assumes() -> None:
    """``energybus simulate modbus --map sunspec_battery`` is a device the scan finds."""
    from energybus.simulators.modbus import ModbusSimulator, load_simulated_map

    port = free_port()

    async def main() -> ScanResult:
        async with ModbusSimulator(load_simulated_map("sunspec_battery"), port=port):
            return await scan("127.0.0.1", port, timeout=1.0)

    result = asyncio.run(main())
    assert result.base == 40000
    assert [(m.model_id, m.address, m.length) for m in result.models] == [
        (1, 40002, 66),
        (103, 40070, 50),
        (120, 40122, 26),
        (124, 40150, 24),
        (802, 40176, 62),
    ]
