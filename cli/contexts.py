"""Named contexts (``mq-cli context``): a broker URL with its token and CA under one name.

Like ``nats context``: ``mq-cli context add prod --url mqs://... --token ... --ca ...``,
``mq-cli context use prod``, then every client command talks to ``prod`` unless given
``--url`` or ``--context OTHER``. The file is ``$XDG_CONFIG_HOME/conveyor/contexts.toml``
(``~/.config/...`` without XDG_CONFIG_HOME), or the path in $CONVEYOR_CONFIG; it holds
tokens, so it is written with mode 0600.

Which broker a command uses: ``--url`` on the command line, else ``--context NAME``, else
$CONVEYOR_URL, else the current context, else ``mq://127.0.0.1:5680``. A ``--token`` or
``--tls-ca`` flag (or its environment variable) overrides the context's.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

CONTEXT_META = "conveyor.context"
_FIELDS = ("url", "token", "ca")


def config_path() -> Path:
    """The contexts file: $CONVEYOR_CONFIG, else $XDG_CONFIG_HOME/conveyor/contexts.toml."""
    explicit = os.environ.get("CONVEYOR_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "conveyor" / "contexts.toml"


def load() -> dict[str, Any]:
    """``{"current": NAME | None, "contexts": {NAME: {url, token?, ca?}}}``; a missing file
    is no contexts, a file that is not TOML is a usage error naming it."""
    path = config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"current": None, "contexts": {}}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(f"cannot read contexts file {path}: {exc}") from None
    contexts = raw.get("contexts", {})
    if not isinstance(contexts, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("url"), str) for v in contexts.values()
    ):
        raise click.UsageError(f"contexts file {path}: each [contexts.NAME] needs a url")
    current = raw.get("current")
    return {"current": current if isinstance(current, str) else None, "contexts": contexts}


def _toml_str(value: str) -> str:
    # A JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string.
    return json.dumps(value)


def save(data: dict[str, Any]) -> Path:
    """Write the file (0600: it holds tokens) via a temporary file and a rename."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"current = {_toml_str(data['current'])}", ""] if data.get("current") else []
    for name, ctx in sorted(data["contexts"].items()):
        lines.append(f"[contexts.{_toml_str(name)}]")
        lines.extend(f"{k} = {_toml_str(ctx[k])}" for k in _FIELDS if ctx.get(k))
        lines.append("")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path


def store_context(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Callback of ``--context``: remembered for :func:`resolve`."""
    if value is not None:
        ctx.meta[CONTEXT_META] = value


def resolve(url: str) -> tuple[str, dict[str, Any]]:
    """The URL the current command connects to and the context's connect keywords
    (token, ca), per the precedence in the module docstring."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return url, {}
    source = ctx.get_parameter_source("url")
    name: str | None = ctx.meta.get(CONTEXT_META)
    if source is ParameterSource.COMMANDLINE:
        if name is None:
            return url, {}
    elif name is None and source is ParameterSource.ENVIRONMENT:
        return url, {}
    data = load()
    if name is None:
        name = data["current"]
        if name is None:
            return url, {}
    entry = data["contexts"].get(name)
    if entry is None:
        known = ", ".join(sorted(data["contexts"])) or "none"
        raise click.UsageError(f"no context {name!r} in {config_path()} (known: {known})")
    extra: dict[str, Any] = {}
    if entry.get("token"):
        extra["token"] = entry["token"]
    chosen = url if source is ParameterSource.COMMANDLINE else entry["url"]
    if entry.get("ca") and chosen.strip().lower().startswith("mqs:"):
        extra["ca"] = entry["ca"]
    return chosen, extra


def _emit(as_json: bool, obj: dict[str, Any], line: str) -> None:
    click.echo(json.dumps(obj) if as_json else line)


@click.group("context")
def context() -> None:
    """Named brokers (URL, token, CA) in a config file; see ``context add --help``."""


_json_flag = click.option("--json", "as_json", is_flag=True, help="One JSON object.")


@context.command("add")
@click.argument("name")
@click.option("--url", required=True, help="Broker URL (mq:// or mqs://).")
@click.option("--token", default=None, help="Access token sent with AUTH.")
@click.option(
    "--ca",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="CA file that signed the broker's certificate (mqs://).",
)
@click.option("--use", "make_current", is_flag=True, help="Also make it the current one.")
@_json_flag
def add(
    name: str, url: str, token: str | None, ca: str | None, make_current: bool, as_json: bool
) -> None:
    """Add (or replace) context NAME. The first context added becomes the current one."""
    from conveyor.client.url import parse_url

    if not name.strip():
        raise click.BadParameter("must not be empty", param_hint="NAME")
    try:
        parse_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    data = load()
    entry = {"url": url}
    if token:
        entry["token"] = token
    if ca:
        entry["ca"] = str(Path(ca).resolve())
    data["contexts"][name] = entry
    if make_current or data["current"] is None:
        data["current"] = name
    path = save(data)
    _emit(
        as_json,
        {"context": name, "url": url, "current": data["current"] == name, "file": str(path)},
        f"added context {name} ({url}){' (current)' if data['current'] == name else ''}",
    )


@context.command("use")
@click.argument("name")
@_json_flag
def use(name: str, as_json: bool) -> None:
    """Make NAME the current context."""
    data = load()
    if name not in data["contexts"]:
        known = ", ".join(sorted(data["contexts"])) or "none"
        raise click.BadParameter(f"no context {name!r} (known: {known})", param_hint="NAME")
    data["current"] = name
    save(data)
    _emit(
        as_json,
        {"context": name, "url": data["contexts"][name]["url"], "current": True},
        f"using context {name} ({data['contexts'][name]['url']})",
    )


@context.command("rm")
@click.argument("name")
@_json_flag
def rm(name: str, as_json: bool) -> None:
    """Remove context NAME (if it was current, no context is current)."""
    data = load()
    if data["contexts"].pop(name, None) is None:
        raise click.BadParameter(f"no context {name!r}", param_hint="NAME")
    if data["current"] == name:
        data["current"] = None
    save(data)
    _emit(as_json, {"context": name, "removed": True}, f"removed context {name}")


@context.command("ls")
@_json_flag
def ls(as_json: bool) -> None:
    """List contexts; the current one is marked ``*`` (tokens are not shown)."""
    data = load()
    rows = [
        {
            "name": n,
            "url": c["url"],
            "current": n == data["current"],
            "token": bool(c.get("token")),
            "ca": c.get("ca") or "",
        }
        for n, c in sorted(data["contexts"].items())
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        cols = ["*" if r["current"] else " ", r["name"], r["url"]]
        cols += ["token"] if r["token"] else []
        cols += [f"ca={r['ca']}"] if r["ca"] else []
        click.echo(f"{cols[0]} " + "\t".join(cols[1:]))
