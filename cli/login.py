"""How the commands that are not the worker log in to the broker: ``--username``, the
password from the environment, and TLS, as the worker's ``[mqtt]`` section does for the
worker. Kept apart from the MQTT client, so that a command's options cost no import of it."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["PASSWORD_ENV", "Login", "login_options"]

PASSWORD_ENV = "ENERGYBUS_MQTT_PASSWORD"
"""Where a command finds the broker password: the environment only, never an option,
so that it is not in the process list or a shell's history."""


@dataclass(frozen=True)
class Login:
    """As whom and how securely a command connects: what the worker's ``[mqtt]``
    section says for the worker."""

    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"Login(username={self.username!r}, tls={self.tls is not None})"


def _login(
    username: str | None,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> Login:
    """The options of :func:`login_options` as a :class:`Login`; a file that cannot be
    used is a usage error naming the option, never a traceback."""
    password = os.environ.get(PASSWORD_ENV) or None
    if password is not None and username is None:
        raise click.UsageError(f"{PASSWORD_ENV} is set but --username is not")
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("--cert-file and --key-file go together")
    context = None
    if tls or ca_file is not None or cert_file is not None:
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as error:
            raise click.BadParameter(f"cannot use it: {error}", param_hint="--ca-file") from None
        if cert_file is not None and key_file is not None:
            try:
                context.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as error:
                raise click.BadParameter(
                    f"cannot use it with --key-file: {error}", param_hint="--cert-file"
                ) from None
    return Login(username, password, context)


def login_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--username``, ``--tls``, ``--ca-file``, ``--cert-file`` and ``--key-file``,
    handed to the command as one ``login`` (a :class:`Login`); the password comes from
    ``ENERGYBUS_MQTT_PASSWORD``."""
    path = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option(
            "--username",
            envvar="ENERGYBUS_MQTT_USERNAME",
            help=f"Log in to the broker as this user (password: {PASSWORD_ENV}).",
        ),
        click.option("--tls", is_flag=True, help="TLS to the broker (the system's trust store)."),
        click.option(
            "--ca-file", type=path, help="CA bundle to verify the broker (implies --tls)."
        ),
        click.option("--cert-file", type=path, help="Client certificate (implies --tls)."),
        click.option("--key-file", type=path, help="The client certificate's private key."),
    ]

    def wrapped(**kwargs: Any) -> Any:
        login = _login(
            kwargs.pop("username"),
            kwargs.pop("tls"),
            kwargs.pop("ca_file"),
            kwargs.pop("cert_file"),
            kwargs.pop("key_file"),
        )
        return command(login=login, **kwargs)

    wrapped.__name__ = command.__name__
    wrapped.__doc__ = command.__doc__
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped
