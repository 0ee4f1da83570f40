"""TLS and token flags of ``mq-cli``.

``security_options`` adds the broker's flags to ``mq-cli server`` (each is passed to
``broker.config.load`` under the setting's name). ``client_options`` adds the flags every
client command shares with ``--url``: they are stored on the click context and
:func:`connect_options` turns them into ``client.connect`` keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from conveyor.cli.contexts import store_context

F = TypeVar("F", bound=Callable[..., Any])
_META = "conveyor.connect_options"


def security_options(f: F) -> F:
    """``--tls-cert``, ``--tls-key``, ``--tls-ca``, ``--tls-port``, ``--plain/--no-plain``,
    ``--allow-anonymous``, ``--require-auth``, ``--http-tls``, ``--http-allowed-hosts``
    (defaults: the config's)."""
    options = [
        click.option(
            "--tls-cert",
            "tls_cert",
            default=None,
            type=click.Path(dir_okay=False),
            help="PEM certificate (chain) for the TLS listener; with --tls-key starts it.",
        ),
        click.option(
            "--tls-key",
            "tls_key",
            default=None,
            type=click.Path(dir_okay=False),
            help="PEM private key of --tls-cert.",
        ),
        click.option(
            "--tls-ca",
            "tls_ca",
            default=None,
            type=click.Path(dir_okay=False),
            help="CA file: TLS clients must present a certificate it signed (mTLS).",
        ),
        click.option(
            "--tls-port",
            "tls_port",
            type=int,
            default=None,
            help="TLS listen port [5681]; 0 = any free.",
        ),
        click.option(
            "--plain/--no-plain",
            "plain",
            default=None,
            help="The plain-TCP listener on --port [on]; --no-plain leaves only TLS.",
        ),
        click.option(
            "--allow-anonymous",
            "allow_anonymous",
            is_flag=True,
            default=None,
            help="Accept anonymous connections from any address (default: loopback "
            "peers only). Anyone who can reach the broker may then do anything.",
        ),
        click.option(
            "--require-auth",
            "require_auth",
            is_flag=True,
            default=None,
            help="Refuse anonymous connections, loopback included: every connection "
            "needs a token (mq-cli token create).",
        ),
        click.option(
            "--tls-client-subject-identity",
            "tls_client_subject_identity",
            is_flag=True,
            default=None,
            help="With --tls-ca: a TLS client that AUTHs without a token is "
            "identified by its certificate's common name (any address).",
        ),
        click.option(
            "--tls-identities",
            "tls_identities",
            default=None,
            type=click.Path(dir_okay=False),
            help='TOML file: [identities."NAME"] configure/write/read lists '
            "(and rate) per certificate name; unlisted names are refused. "
            "Unset: every certificate may do anything.",
        ),
        click.option(
            "--http-tls",
            "http_tls",
            is_flag=True,
            default=None,
            help="Serve the HTTP listener over TLS with --tls-cert/--tls-key "
            "(and --tls-ca: client certificates required).",
        ),
        click.option(
            "--http-allowed-hosts",
            "http_allowed_hosts",
            default=None,
            metavar="NAMES",
            help="Comma-separated Host names anonymous HTTP callers may use "
            "besides localhost, 127.0.0.1 and [::1] (DNS-rebinding guard).",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is None or param.name is None:
        return
    from_env = ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
    ctx.meta.setdefault(_META, {})[param.name] = (value, from_env)


def client_options(f: F) -> F:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` (for ``mqs://`` URLs), ``--token`` and
    ``--context`` (cli.contexts)."""
    options = [
        click.option(
            "--tls-ca",
            "ca",
            envvar=["CONVEYOR_TLS_CA", "MQ_TLS_CA"],
            type=click.Path(exists=True, dir_okay=False),
            expose_value=False,
            callback=_store,
            help="CA file that signed the broker's certificate, for mqs:// URLs "
            "[system CAs] (env CONVEYOR_TLS_CA).",
        ),
        click.option(
            "--tls-cert",
            "cert",
            envvar=["CONVEYOR_TLS_CERT", "MQ_TLS_CERT"],
            type=click.Path(exists=True, dir_okay=False),
            expose_value=False,
            callback=_store,
            help="Client certificate, for brokers that require one (env CONVEYOR_TLS_CERT).",
        ),
        click.option(
            "--tls-key",
            "key",
            envvar=["CONVEYOR_TLS_KEY", "MQ_TLS_KEY"],
            type=click.Path(exists=True, dir_okay=False),
            expose_value=False,
            callback=_store,
            help="Key of --tls-cert (env CONVEYOR_TLS_KEY).",
        ),
        click.option(
            "--token",
            "token",
            envvar=["CONVEYOR_TOKEN", "MQ_TOKEN"],
            expose_value=False,
            callback=_store,
            help="Access token (mq-cli token create; env CONVEYOR_TOKEN); "
            "default: the URL's user part, else anonymous.",
        ),
        click.option(
            "--context",
            "context",
            metavar="NAME",
            expose_value=False,
            callback=store_context,
            help="Use the named context's URL, token and CA (mq-cli context).",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def connect_options(url: str) -> dict[str, Any]:
    """``client.connect`` keywords from the current command's flags.

    TLS settings from the environment apply to ``mqs://`` URLs only; given as flags with an
    ``mq://`` URL they are an error (``client.connect`` refuses them)."""
    ctx = click.get_current_context(silent=True)
    stored: dict[str, tuple[Any, bool]] = ctx.meta.get(_META, {}) if ctx is not None else {}
    tls = url.strip().lower().startswith("mqs:")
    out: dict[str, Any] = {}
    for name, (value, from_env) in stored.items():
        if name != "token" and from_env and not tls:
            continue
        out[name] = value
    return out
