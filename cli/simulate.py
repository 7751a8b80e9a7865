"""``energybus simulate``: play a source platform, for demos, tests and benchmarks. A thin
layer over :mod:`energybus.simulators`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import click

from energybus.cli.login import Login, login_options
from energybus.cli.signals import until_signal

if TYPE_CHECKING:
    from energybus.simulators.mqtt import Platform
    from energybus.simulators.voke import Stats

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:15672/"  # tools/services.py's demo RabbitMQ
KEY_ENV = "ENERGYBUS_VOKE_SIGNING_KEY"
CPI_SECRET_ENV = "ENERGYBUS_CPI_SECRET"


@click.group()
def simulate() -> None:
    """Play a source platform, for demos, tests and benchmarks."""


_answer_delay = click.option(
    "--answer-delay",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    metavar="S",
    help="Seconds before a command is answered.",
)
_duration = click.option(
    "--duration", type=click.FloatRange(min=0), metavar="S", help="Stop after S s."
)
_seed = click.option("--seed", type=int, help="Reproducible values.")
_site = click.option("--site", default="demo", show_default=True, help="Site of --print-config.")


def _every(value: float) -> float | None:
    return value if value > 0 else None


@simulate.command()
@click.option("--org", required=True, metavar="SLUG", help="The organisation Voke plays.")
@click.option(
    "--plants", type=click.IntRange(min=1), default=1, show_default=True, help="Plants P-1..P-N."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Telemetry messages per second, over all devices.",
)
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="ENERGYBUS_VOKE_URL",
    help="The RabbitMQ broker (or ENERGYBUS_VOKE_URL).",
)
@click.option("--vhost", metavar="VHOST", help="The virtual host, instead of the URL's.")
@click.option(
    "--signing-key-env",
    default=KEY_ENV,
    show_default=True,
    metavar="NAME",
    help="The environment variable holding the org's signing key.",
)
@click.option(
    "--answer",
    type=click.Choice(["ack", "nack", "none"]),
    default="ack",
    show_default=True,
    help="How commands are answered (none: never, so they expire).",
)
@_answer_delay
@click.option(
    "--meter-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Seconds between each device's meter readings (energy counters).",
)
@click.option(
    "--alarm-every",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    metavar="S",
    help="Seconds between alarms, each cleared a little later (0: none).",
)
@click.option(
    "--mode-every",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    metavar="S",
    help="Seconds between plant mode changes (0: none).",
)
@_duration
@click.option(
    "--count", type=click.IntRange(min=0), metavar="N", help="Stop after N telemetry messages."
)
@_seed
@click.option("--print-config", is_flag=True, help="Print the plants' site configuration; exit.")
def voke(
    org: str,
    plants: int,
    rate: float,
    url: str,
    vhost: str | None,
    signing_key_env: str,
    answer: Literal["ack", "nack", "none"],
    answer_delay: float,
    meter_interval: float,
    alarm_every: float,
    mode_every: float,
    duration: float | None,
    count: int | None,
    seed: int | None,
    print_config: bool,
) -> None:
    """Play Voke ESM for an organisation on a RabbitMQ broker (the VCP format).

    Declares the exchange vcp and the org's seven queues, publishes telemetry of plants
    P-1..P-N (each with devices B1 battery, M1 meter, P1 pv) at --rate with publisher
    confirms, raises and clears alarms, changes plant modes, and answers the commands on
    vcp.<org>.command. Messages are signed with the key in the environment variable
    --signing-key-env. --print-config prints the site configuration of these plants.

    Runs until SIGINT or SIGTERM, --duration or --count, then prints a summary. Exit
    status: 0 done; 1 broker unreachable, login refused or connection lost; 2 usage
    error or no signing key.
    """
    from energybus.simulators.voke import (
        VokeConnectionError,
        VokeSimulator,
        check_org,
        site_config,
    )

    try:
        check_org(org)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--org") from None
    if print_config:
        click.echo(site_config(org=org, plants=plants), nl=False)
        return
    key = os.environ.get(signing_key_env)
    if not key:
        click.echo(
            f"error    no signing key: the environment variable {signing_key_env} is not set "
            "(it holds the org's signing key; --signing-key-env names another)",
            err=True,
        )
        sys.exit(2)
    try:
        simulator = VokeSimulator(
            url=url,
            org=org,
            signing_key=key,
            vhost=vhost,
            plants=plants,
            rate=rate,
            answer=answer,
            answer_delay_s=answer_delay,
            meter_interval_s=meter_interval,
            alarm_every_s=_every(alarm_every),
            mode_every_s=_every(mode_every),
            seed=seed,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    # Connection faults are reported in one line below; the drivers' own log lines would
    # repeat them, with tracebacks.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False
    names = "plant P-1" if plants == 1 else f"plants P-1..P-{plants}"
    click.echo(
        f"voke     org {org}: {names} ({plants * 4} devices), {rate:g} telemetry/s, "
        f"answer {answer}" + ("" if answer == "none" else f" after {answer_delay:g} s")
    )

    def ready() -> None:
        click.echo(
            f"ready    {simulator.url} (vhost {simulator.vhost}): exchange vcp, "
            f"queues vcp.{org}.*; SIGINT or SIGTERM stops"
        )

    async def main(stop: asyncio.Event) -> Stats:
        return await simulator.run(stop=stop, duration_s=duration, count=count, on_ready=ready)

    try:
        stats = until_signal(main)
    except VokeConnectionError as error:
        click.echo(f"error    {error}", err=True)
        if any(error.stats.published.values()):
            click.echo(f"stopped  {error.stats.summary()}")
        sys.exit(1)
    click.echo(f"stopped  {stats.summary()}")


@simulate.command()
@click.option(
    "--map",
    "map_name",
    required=True,
    metavar="NAME",
    help="A packaged register map (energybus mappings check lists them) or a map file.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=5020,
    show_default=True,
    help="TCP port (Modbus TCP); with --devices N, N ports from here.",
)
@click.option("--unit", type=click.IntRange(0, 255), help="Unit id (default: the map's).")
@click.option(
    "--devices", type=click.IntRange(min=1), default=1, show_default=True, help="Devices to serve."
)
@click.option(
    "--hang",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="The last N devices take requests and never answer (to see timeouts).",
)
@_site
@_duration
@_seed
@click.option("--print-config", is_flag=True, help="Print the devices' site configuration; exit.")
def modbus(
    map_name: str,
    host: str,
    port: int,
    unit: int | None,
    devices: int,
    hang: int,
    site: str,
    duration: float | None,
    seed: int | None,
    print_config: bool,
) -> None:
    """Serve a Modbus device from a register map (Modbus TCP, pymodbus).

    Values change plausibly: measurements wander, counters grow, a battery's state of
    charge follows the rate setpoints written to it; a SunSpec map's model chain is
    served where the map says. Writes are taken only on the map's writable registers.
    --print-config prints the site configuration that polls these devices.

    Runs until SIGINT or SIGTERM or --duration, then prints what it served. Exit status:
    0 done; 1 the port cannot be opened; 2 usage error or an invalid map.
    """
    from energybus.errors import MappingError
    from energybus.simulators.modbus import ModbusSimulator, load_simulated_map, site_config

    try:
        register_map = load_simulated_map(map_name)
    except MappingError as error:
        # A packaged name that does not exist has no file to point at.
        click.echo(f"error    {error if error.file else error.message}", err=True)
        sys.exit(2)
    if port + devices - 1 > 65535:
        raise click.BadParameter("the ports run past 65535", param_hint="--devices")
    if print_config:
        click.echo(site_config(register_map, site=site, host=host, port=port, devices=devices))
        return
    simulators = [
        ModbusSimulator(
            register_map,
            host=host,
            port=port + i,
            unit_id=unit,
            seed=None if seed is None else seed + i,
        )
        for i in range(devices)
    ]
    for simulator in simulators[devices - min(hang, devices) :]:
        simulator.silent = True

    async def main(stop: asyncio.Event) -> None:
        started = []
        try:
            for simulator in simulators:
                await simulator.start()
                started.append(simulator)
            last = simulators[-1].port
            ports = f"port {port}" if devices == 1 else f"ports {port}-{last}"
            click.echo(
                f"ready    {register_map.name} on {host} {ports}, unit {simulators[0].unit_id};"
                " SIGINT or SIGTERM stops"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        finally:
            for simulator in started:
                await simulator.stop()

    try:
        until_signal(main)
    except (OSError, RuntimeError) as error:
        click.echo(f"error    cannot serve on {host}:{port}: {error}", err=True)
        sys.exit(1)
    reads = sum(s.reads for s in simulators)
    writes = sum(len(s.writes) for s in simulators)
    click.echo(f"stopped  {reads} reads served, {writes} writes taken")


# Platforms that speak MQTT -------------------------------------------------------------------

_broker = [
    click.option(
        "--host", default="127.0.0.1", show_default=True, help="The MQTT broker's address."
    ),
    click.option(
        "--port",
        type=click.IntRange(1, 65535),
        default=18830,
        show_default=True,
        help="The MQTT broker's port (default: the demo broker's).",
    ),
    click.option(
        "--interval",
        type=click.FloatRange(min=0, min_open=True),
        default=5.0,
        show_default=True,
        metavar="S",
        help="Seconds between telemetry rounds.",
    ),
    _answer_delay,
    _duration,
    _seed,
    _site,
    click.option("--print-config", is_flag=True, help="Print the site configuration; exit."),
]


@dataclass(frozen=True)
class _Mqtt:
    """The options every MQTT platform's command takes."""

    host: str
    port: int
    login: Login
    interval: float
    answer_delay: float
    duration: float | None
    seed: int | None
    site: str
    print_config: bool


def _mqtt_options(command: Callable[..., None]) -> Callable[..., None]:
    command = login_options(command)
    for option in reversed(_broker):
        command = option(command)
    return command


def _play_mqtt(platform: Platform, options: _Mqtt, *, name: str, ready: str) -> None:
    """Connect, play ``platform`` until a signal or ``--duration``, print what was done.
    A broker that cannot be reached or goes away is one line and exit status 1."""
    from energybus.cli.mqtt import MqttLink
    from energybus.simulators.mqtt import Played, Player

    o = options

    async def main(stop: asyncio.Event) -> Played:
        link = MqttLink()
        await link.connect(o.host, o.port, name=name, login=o.login)
        try:
            player = Player(platform, link, interval_s=o.interval, answer_delay_s=o.answer_delay)
            link.on_message = lambda topic, payload, retain: player.received(topic, payload)
            await link.subscribe(list(platform.filters))
            click.echo(f"ready    {ready}; SIGINT or SIGTERM stops")
            return await player.run(stop=stop, duration_s=o.duration)
        finally:
            await link.close()

    try:
        played = until_signal(main)
    except ConnectionError as error:
        click.echo(f"error    {error}", err=True)
        sys.exit(1)
    click.echo(
        f"stopped  published {played.telemetry} telemetry, {played.answers} answers; "
        f"{platform.summary()}"
    )


@simulate.command()
@click.option("--ven-id", default="ven-1", show_default=True, help="The VEN's venId.")
@_mqtt_options
def ven(ven_id: str, **options: Any) -> None:
    """Play a VEN (demand-response node) on an MQTT broker, in its own format.

    Publishes metering on volttron/metering every --interval (its load, battery, panel
    and circuits) and answers the commands on ven/cmd/<venId> on ven/ack/<venId>: an
    event sheds circuits and reports what it shed, a restore ends it, a ping is answered
    pong. --print-config prints the site configuration that takes it.

    Runs until SIGINT or SIGTERM or --duration, then prints what it did. Exit status: 0
    done; 1 broker unreachable or gone; 2 usage error.
    """
    from energybus.simulators.ven import METERING_TOPIC, VenMessages, site_config

    o = _Mqtt(**options)
    try:
        platform = VenMessages(ven_id=ven_id, seed=o.seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--ven-id") from None
    if o.print_config:
        click.echo(site_config(ven_id=ven_id, site=o.site), nl=False)
        return
    ready = (
        f"ven {ven_id} on {o.host}:{o.port}: {METERING_TOPIC} every {o.interval:g} s, "
        f"commands on {platform.filters[0]}"
    )
    _play_mqtt(platform, o, name=f"ven-{ven_id}", ready=ready)


@simulate.command()
@click.option("--plant", "plant_id", default="PLANT-1", show_default=True, help="The plantId.")
@click.option(
    "--secret-env",
    default=CPI_SECRET_ENV,
    show_default=True,
    metavar="NAME",
    help="The environment variable holding the plant's HMAC secret.",
)
@_mqtt_options
def cpi(plant_id: str, secret_env: str, **options: Any) -> None:
    """Play a Voke / CPI plant on an MQTT broker: signed telemetry, signed ACKs.

    The plant and its devices B1 (battery), M1 (grid meter) and PV1 (pv) each publish a
    telemetry message on cpi/<plantId>/telemetry every --interval, signed with the secret
    in the environment variable --secret-env. Commands on cpi/<plantId>/commands are
    verified (signature, time, a cmdId not seen before), carried out and answered on
    cpi/<plantId>/commands/ack. --print-config prints the site configuration.

    Runs until SIGINT or SIGTERM or --duration, then prints what it did. Exit status: 0
    done; 1 broker unreachable or gone; 2 usage error or no secret.
    """
    from energybus.simulators.cpi import DEVICES, CpiMessages, check_plant_id, site_config

    o = _Mqtt(**options)
    try:
        check_plant_id(plant_id)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--plant") from None
    if o.print_config:
        click.echo(site_config(plant_id=plant_id, site=o.site, secret_env=secret_env), nl=False)
        return
    secret = os.environ.get(secret_env)
    if not secret:
        click.echo(
            f"error    no secret: the environment variable {secret_env} is not set "
            "(it holds the plant's HMAC secret; --secret-env names another)",
            err=True,
        )
        sys.exit(2)
    platform = CpiMessages(plant_id=plant_id, secret=secret, seed=o.seed)
    ready = (
        f"plant {plant_id} on {o.host}:{o.port}: {len(DEVICES)} devices every {o.interval:g} s,"
        f" signed; commands on {platform.filters[0]}"
    )
    _play_mqtt(platform, o, name=f"cpi-{plant_id}", ready=ready)
