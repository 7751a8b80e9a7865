"""``energybus retire``: drop a decommissioned worker's broker sessions."""

from __future__ import annotations

import asyncio
import sys

import click

from energybus.cli.run import _config, _load


@click.command()
@_config
def retire(config_path: str) -> None:
    """Drop the broker sessions of a worker that is gone for good, and what is queued.

    Connects as <client_id>-src and <client_id>-bus with session expiry 0 and
    disconnects, so the broker discards both sessions and everything queued for them.
    For a worker that is decommissioned or whose client_id changes; a worker that comes
    back afterwards starts with empty sessions. Refused while the worker's retained
    status (<topic_prefix>/worker/<client_id>/status) says online.

    Exit status: 0 done; 2 refused, invalid configuration, broker unreachable, or a
    worker connected meanwhile.
    """
    from energybus.worker.retire import RetireError, WorkerOnline, retire as retire_worker

    config = _load(config_path)
    try:
        result = asyncio.run(retire_worker(config))
    except WorkerOnline as error:
        click.echo(f"refused  {error}", err=True)
        sys.exit(2)
    except RetireError as error:
        click.echo(f"error    {error}", err=True)
        sys.exit(2)
    out = click.echo
    worker = config.mqtt.client_id
    if result.status is None:
        out(f"worker   {worker}: no status retained on {result.status_topic}")
    else:
        status = result.status.decode("utf-8", "replace")
        out(f"worker   {worker}: {status} ({result.status_topic})")
    for session in result.sessions:
        if not session.present:
            out(f"none     no session {session.client_id} on the broker")
            continue
        if session.queued == 0:
            held = "nothing was queued for it"
        else:
            count = f"{session.queued}" if session.complete else f"at least {session.queued}"
            plural = "" if session.queued == 1 else "s"
            held = f"it held {count} queued message{plural}"
        out(f"dropped  session {session.client_id} ({held})")
