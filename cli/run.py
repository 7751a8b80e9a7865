"""``energybus run`` and ``energybus check``: the worker and its plan."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from energybus.adapters import AmqpEndpoint, ModbusEndpoint
from energybus.errors import MappingError

if TYPE_CHECKING:
    from energybus.worker import Config

_config = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Site configuration (TOML).",
)


def _load(config_path: str) -> Config:
    from energybus.worker import load_config

    try:
        return load_config(config_path)
    except MappingError as error:
        click.echo(f"invalid  {error}", err=True)
        sys.exit(2)


@click.command()
@_config
@click.option("--shared-group", help="Subscribe through $share/NAME/... to split the load.")
@click.option(
    "--member",
    metavar="INDEX/COUNT",
    help="With --shared-group: handle only the sites that hash to INDEX of COUNT members.",
)
@click.option("--log-format", type=click.Choice(["human", "json"]), help="Default: human.")
def run(
    config_path: str, shared_group: str | None, member: str | None, log_format: str | None
) -> None:
    """Run the worker until SIGTERM or SIGINT (then flush, mark offline, exit 0)."""
    from energybus.worker import run_worker
    from energybus.worker.logs import setup_logging

    config = _load(config_path)
    try:
        config.with_overrides(shared_group=shared_group, member=member, log_format=log_format)
    except MappingError as error:
        click.echo(f"invalid  {error}", err=True)
        sys.exit(2)
    setup_logging(config.worker.log_format, config.worker.log_level)
    try:
        status = run_worker(config)
    except MappingError as error:  # found while assembling the worker, before any I/O
        click.echo(f"invalid  {error}", err=True)
        sys.exit(2)
    sys.exit(status)


@click.command()
@_config
def check(config_path: str) -> None:
    """Validate a configuration and its mappings and print the worker's plan.

    Exit status: 0 valid, 2 invalid (the error names file, line and key).
    """
    from energybus.worker import Worker

    config = _load(config_path)
    m, w, h = config.mqtt, config.worker, config.historian
    try:
        plan = Worker.plan(config)
    except MappingError as error:
        click.echo(f"invalid  {error}", err=True)
        sys.exit(2)
    out = click.echo
    out(f"config     {config.file}")
    auth = "username/password" if m.username else "anonymous"
    tls = "tls" if m.tls else "plain tcp"
    out(
        f"mqtt       {m.host}:{m.port} ({tls}, {auth}), MQTT 5, session expiry "
        f"{m.session_expiry_s} s (source), {config.bus_session_expiry_s} s "
        f"({'bus ingest' if w.bus_ingest else 'bus, no ingest'}), "
        f"receive maximum {m.receive_maximum}, max in flight {m.max_inflight}"
    )
    out(f"           {m.client_id}-src subscribes to sources, {m.client_id}-bus publishes")
    if w.shared_group is not None:
        member = config.member
        split = (
            f"member {member[0]} of {member[1]}: the sites whose CRC-32 modulo {member[1]}"
            f" is {member[0]}"
            if member is not None
            else "shared subscriptions: each message to one member"
        )
        out(f"group      {w.shared_group}, {split}; publishes marked energybus-group")
    for name, filters, commands in plan.adapters:
        out(f"adapter    {name}")
        for f in filters:
            out(f"  source   {f}  (QoS 1)")
        for f in commands:
            out(f"  command  {f}  (QoS 1, retain as published)")
        gate = config.built[name].gate if name in config.built else None
        if commands and gate is not None:
            policy = gate.policy
            out(
                f"  gate     sets older than {policy.max_age_s:g} s or {policy.max_future_s:g} s "
                f"ahead refused; {len(gate.series)} series ages, {len(gate.interlocks)} interlocks"
            )
    for _, source, declaration in plan.connections:
        e = declaration.endpoint
        assert isinstance(e, AmqpEndpoint)
        out(
            f"amqp       {source}: {e.uri} vhost {e.vhost} as {e.username} (password set), "
            f"prefetch {e.prefetch}, manual ack"
        )
        for queue in declaration.patterns:
            out(f"  queue    {queue}  (checked passively at start-up)")
        for key in declaration.publishes:
            out(f"  command  {e.exchange} <- {key}  (mandatory, publisher confirms)")
    for _, _, declaration in plan.devices:
        d = declaration.endpoint
        assert isinstance(d, ModbusEndpoint)
        where = d.serial_port if d.transport == "rtu" else f"{d.host}:{d.port}"
        reads = ", ".join(f"{r.table} {r.address}+{r.count}" for r in d.reads)
        out(
            f"modbus     {d.name}: {d.transport} {where} unit {d.unit_id},"
            f" every {d.interval_s:g} s, timeout {d.timeout_s:g} s x {d.retries + 1},"
            f" offline after {d.offline_after} failed"
        )
        out(f"  reads    {reads}")
        for key in declaration.publishes:
            out(f"  command  {key}  (write, read back, confirm on value)")
    if plan.devices:
        out(
            f"poll outbox {w.data_dir}/poll-outbox-<adapter>.sqlite3"
            f"  (at most {w.poll_outbox_max_mb:g} MB)"
        )
    for f in plan.ingest:
        out(f"ingest     {f}  (QoS 1, no local) -> historians")
    out("publish    canonical value/last/meta/availability per the delivery policy")
    out(f"status     {plan.status_topic}  (retained online/offline, last will)")
    out(f"dead       {plan.dead_letter_prefix}/<source>  (QoS 1, not retained)")
    if h.dsn is not None:
        out(
            f"historian  {config.redacted_dsn()}  (batches of {h.batch_rows} rows or "
            f"{h.batch_interval_s} s)"
        )
        out(f"outbox     {w.data_dir / 'outbox.sqlite3'}  (at most {h.outbox_max_mb:g} MB)")
        for c in h.counters:
            out(
                f"counter    {c.site}/{c.device}/{c.metric}: wrap_at {c.wrap_at}, "
                f"max_rate {c.max_rate}/s"
            )
    else:
        out("historian  off (no [historian] dsn)")
    if w.metrics_port is not None:
        out(f"metrics    http://{w.metrics_host}:{w.metrics_port}/metrics")
    out(f"availability offline after {w.availability_timeout_s:g} s of silence")
