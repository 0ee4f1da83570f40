"""Generate protocol tables from ``spec/protocol.toml`` (the one source of truth).

Writes ``protocol/_generated.py`` (frame classes, codecs, error classes),
``spec/vectors/frames.json`` (one vector per frame type, built with msgpack directly,
not with ``protocol/``) and the tables between GENERATED markers in ``spec/PROTOCOL.md``.

Usage: ``python tools/gen_protocol.py`` (write) or ``--check`` (exit 1 if stale).
"""

from __future__ import annotations

import json
import re
import struct
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "protocol.toml"
GEN_PY = ROOT / "protocol" / "_generated.py"
VECTORS = ROOT / "spec" / "vectors" / "frames.json"
DOC = ROOT / "spec" / "PROTOCOL.md"

PY_TYPES = {
    "rid": "int",
    "u16": "int",
    "u32": "int",
    "u64": "int",
    "priority": "int",
    "bool": "bool",
    "name": "str",
    "str": "str",
    "bytes": "bytes",
    "table": "dict[str, Any]",
    "props": "dict[str, Any]",
    "strlist": "list[str]",
    "tablelist": "list[dict[str, Any]]",
    "binlist": "list[bytes]",
}
WIRE_TYPES = {
    "rid": "uint32 (1..2^32-1)",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "priority": "uint 0..9",
    "bool": "bool",
    "name": "string <= 255 bytes",
    "str": "string <= 65535 bytes",
    "bytes": "bin",
    "table": "map string -> any",
    "props": "properties map",
    "strlist": "array of name",
    "tablelist": "array of table",
    "binlist": "array of bin",
}


def camel(name: str) -> str:
    return "".join(p.capitalize() for p in re.split(r"[_-]", name))


def check_expr(ftype: str, val: str, where: str) -> str:
    w = repr(where)
    simple = {
        "rid": f"check_uint({val}, U32_MAX, {w}, 1)",
        "u16": f"check_uint({val}, U16_MAX, {w})",
        "u32": f"check_uint({val}, U32_MAX, {w})",
        "u64": f"check_uint({val}, U64_MAX, {w})",
        "priority": f"check_uint({val}, 9, {w})",
        "bool": f"check_bool({val}, {w})",
        "name": f"check_str({val}, NAME_MAX, {w})",
        "str": f"check_str({val}, STR_MAX, {w})",
        "bytes": f"check_bytes({val}, {w})",
        "table": f"check_table({val}, {w})",
        "props": f"check_props({val}, {w})",
        "strlist": f"check_strlist({val}, {w})",
        "tablelist": f"check_tablelist({val}, {w})",
        "binlist": f"check_binlist({val}, {w})",
    }
    if ftype in simple:
        return simple[ftype]
    if ftype.startswith("list:"):
        rec = camel(ftype[5:])
        return f"[{rec}.from_wire(e, {w}) for e in check_list({val}, {w})]"
    raise SystemExit(f"unknown field type {ftype}")


def py_type(ftype: str) -> str:
    if ftype.startswith("list:"):
        return f"list[{camel(ftype[5:])}]"
    return PY_TYPES[ftype]


def default_src(default: Any, ftype: str = "") -> str:
    if ftype == "bytes":
        return repr(default.encode())
    if isinstance(default, dict):
        return "{}"
    if isinstance(default, list):
        return "[]"
    return repr(default)


def dataclass_default(default: Any, ftype: str = "") -> str:
    if ftype == "bytes":
        return f" = {default.encode()!r}"
    if isinstance(default, dict):
        return " = field(default_factory=dict)"
    if isinstance(default, list):
        return " = field(default_factory=list)"
    return f" = {default!r}"


# Fast-path guards: the common valid case costs one or two comparisons inline; anything
# else goes to the checker, which raises a precise MalformedFrame (or returns if valid).
FAST_GUARD = {
    "rid": "type({v}) is not int or not 0 < {v} <= U32_MAX",
    "u16": "type({v}) is not int or not 0 <= {v} <= U16_MAX",
    "u32": "type({v}) is not int or not 0 <= {v} <= U32_MAX",
    "u64": "type({v}) is not int or not 0 <= {v} <= U64_MAX",
    "bool": "{v} is not True and {v} is not False",
    "name": "type({v}) is not str or len({v}) > NAME_FAST",
    "str": "type({v}) is not str or len({v}) > STR_FAST",
    "bytes": "type({v}) is not bytes",
    "table": "type({v}) is not dict or {v}",
    "props": "type({v}) is not dict or {v}",
}


def field_stmts(i: int, fname: str, ftype: str, default: Any, src: str, indent: str) -> list[str]:
    """Statements that bind a{i} to the validated field value (or its default)."""
    where = f'where + ".{fname}"'
    v = f"a{i}"
    body: list[str] = []
    if ftype in FAST_GUARD:
        check = check_expr(ftype, v, "W").replace("'W'", where)
        body = [f"{v} = {src}", f"if {FAST_GUARD[ftype].format(v=v)}:", f"    {check}"]
    elif ftype.startswith("list:"):
        rec = camel(ftype[5:])
        body = [f"{v} = {rec}.list_from_wire({src}, {where})"]
    else:
        body = [f"{v} = " + check_expr(ftype, src, "W").replace("'W'", where)]
    if default == "REQUIRED":
        return [indent + b for b in body]
    out = [f"{indent}if n > {i}:"] + [indent + "    " + b for b in body]
    out += [f"{indent}else:", f"{indent}    {v} = {default_src(default, ftype)}"]
    return out


def gen_record(cls: str, fields: list[list[Any]], doc: str, where_prefix: str) -> list[str]:
    """Records (entries of batch frames) are NamedTuples: immutable and cheap to build."""
    out = [
        "",
        "",
        f"class {cls}(NamedTuple):",
        f'    """{doc} (treat field values as read-only)"""',
        "",
    ]
    for fname, ftype, default, _desc in fields:
        dflt = "" if default == "REQUIRED" else f" = {default_src(default, ftype)}"
        out.append(f"    {fname}: {py_type(ftype)}{dflt}")
    required = sum(1 for f in fields if f[2] == "REQUIRED")
    total = len(fields)
    out += ["", "    def to_wire(self) -> list[Any]:", "        return list(self)", ""]
    out += [
        "    @classmethod",
        f"    def from_wire(cls, f: Any, where: str = {where_prefix!r}) -> {cls}:",
        f"        check_arity(f, {required}, {total}, where)",
        "        n = len(f)",
    ]
    for i, (fname, ftype, default, _) in enumerate(fields):
        out += field_stmts(i, fname, ftype, default, f"f[{i}]", "        ")
    out.append(f"        return _tuple_new(cls, ({', '.join(f'a{i}' for i in range(total))},))")
    # list decoder: full-arity entries are validated inline and become tuples directly
    out += [
        "",
        "    @classmethod",
        f"    def list_from_wire(cls, v: Any, where: str) -> list[{cls}]:",
        "        if type(v) is not list:",
        "            check_list(v, where)",
        f"        out: list[{cls}] = []",
        "        append = out.append",
        "        for f in v:",
        f"            if type(f) is not list or len(f) != {total}:",
        "                append(cls.from_wire(f, where))",
        "                continue",
    ]
    for i, (fname, ftype, _default, _) in enumerate(fields):
        out += field_stmts(i, fname, ftype, "REQUIRED", f"f[{i}]", "            ")
    out += ["            append(_tuple_new(cls, f))", "        return out"]
    return out


def gen_class(
    cls: str, base: str, fields: list[list[Any]], doc: str, classvars: list[str], where_prefix: str
) -> list[str]:
    seen_default = False
    for fname, _t, default, _d in fields:
        if default == "REQUIRED" and seen_default:
            raise SystemExit(f"{where_prefix}.{fname}: required field after a defaulted one")
        seen_default = seen_default or default != "REQUIRED"
    out = ["", "", "@dataclass(frozen=True, slots=True)", f"class {cls}({base}):"]
    out.append(f'    """{doc}"""')
    out.append("")
    out.extend(f"    {cv}" for cv in classvars)
    for fname, ftype, default, _desc in fields:
        dflt = "" if default == "REQUIRED" else dataclass_default(default, ftype)
        out.append(f"    {fname}: {py_type(ftype)}{dflt}")
    required = sum(1 for f in fields if f[2] == "REQUIRED")
    out.append("")
    out.append("    def to_wire(self) -> list[Any]:")
    parts = []
    for fname, ftype, _d, _ in fields:
        if ftype.startswith("list:"):
            parts.append(f"[list(e) for e in self.{fname}]")
        else:
            parts.append(f"self.{fname}")
    out.append(f"        return [{', '.join(parts)}]")
    out.append("")
    out.append("    @classmethod")
    out.append(f"    def from_wire(cls, f: Any, where: str = {where_prefix!r}) -> {cls}:")
    out.append(f"        check_arity(f, {required}, {len(fields)}, where)")
    if any(f[2] != "REQUIRED" for f in fields):
        out.append("        n = len(f)")
    for i, (fname, ftype, default, _) in enumerate(fields):
        out += field_stmts(i, fname, ftype, default, f"f[{i}]", "        ")
    out.append(f"        return cls({', '.join(f'a{i}' for i in range(len(fields)))})")
    return out


def gen_python(spec: dict[str, Any]) -> str:
    p = spec["protocol"]
    lines = [
        '"""Frame classes, codecs and error classes generated from spec/protocol.toml.',
        "",
        "DO NOT EDIT: run ``python tools/gen_protocol.py`` after changing the spec.",
        '"""',
        "",
        "# ruff: noqa",
        "from __future__ import annotations",
        "",
        "import enum",
        "from dataclasses import dataclass, field",
        "from typing import Any, ClassVar, NamedTuple",
        "",
        "from conveyor.protocol._checks import (",
        "    NAME_MAX, STR_MAX, U16_MAX, U32_MAX, U64_MAX, check_arity, check_binlist, check_bool, check_bytes,",
        "    check_list, check_str, check_strlist, check_table, check_tablelist, check_uint, fail,",
        ")",
        "from conveyor.protocol.errors import FatalError, RemoteProtocolError, RequestError",
        "",
        "_tuple_new = tuple.__new__",
        "NAME_FAST = NAME_MAX // 4  # strings this short cannot exceed the byte limit",
        "STR_FAST = STR_MAX // 4",
        "",
        f"MAGIC = {p['magic'].encode()!r}",
        f"VERSION_MAJOR = {p['major']}",
        f"VERSION_MINOR = {p['minor']}",
        "PREAMBLE = MAGIC + bytes([VERSION_MAJOR, VERSION_MINOR])",
        f"DEFAULT_PORT = {p['default_port']}",
        f"MAX_FRAME_SIZE_DEFAULT = {p['max_frame_size_default']}",
        f"MAX_FRAME_SIZE_FLOOR = {p['max_frame_size_floor']}",
        f"MAX_FRAME_SIZE_CEILING = {p['max_frame_size_ceiling']}",
        f"MAX_FRAME_SIZE_PREAUTH = {p['max_frame_size_preauth']}",
        f"HEARTBEAT_MS_DEFAULT = {p['heartbeat_ms_default']}",
        f"HEARTBEAT_MS_FLOOR = {p['heartbeat_ms_floor']}",
        f"MAX_NESTING_DEPTH = {p['max_nesting_depth']}",
        f"MESSAGE_FRAME_OVERHEAD = {p['message_frame_overhead']}",
        "",
        "",
        "# ------------------------------------------------------------------ errors",
    ]
    for e in spec["error"]:
        if not e["fatal"] and e["code"] < 300:
            continue  # 200 "ok" is a CLOSE reason, not an error: no exception class
        cls = camel(e["name"])
        if cls == "NotImplemented":
            cls = "NotImplementedByServer"
        if e.get("protocol_error"):
            base = "RemoteProtocolError"
        elif e["fatal"]:
            base = "FatalError"
        else:
            base = "RequestError"
        lines += [
            "",
            "",
            f"class {cls}({base}):",
            f'    """{e["doc"]}"""',
            "",
            f"    code = {e['code']}",
            f"    name = {e['name']!r}",
            f"    fatal = {e['fatal']!r}",
            f"    retriable = {e['retriable']!r}",
            f"    origin = {e['origin']!r}",
        ]
    lines += ["", "", "ERROR_CODES: dict[str, int] = {"]
    lines += [f"    {e['name']!r}: {e['code']}," for e in spec["error"]]
    lines += ["}", ""]
    lines += [
        "FATAL_CODES: frozenset[int] = frozenset({"
        + ", ".join(str(e["code"]) for e in spec["error"] if e["fatal"])
        + "})"
    ]
    # properties
    lines += [
        "",
        "",
        "# ------------------------------------------------------------------ properties",
        "PROPERTY_TYPES: dict[str, str] = {",
    ]
    lines += [f"    {k!r}: {v[0]!r}," for k, v in spec["properties"].items()]
    # check_props: one dict lookup and the type's fast guard per key; anything else (or an
    # unknown key) goes to the precise checker, which raises or accepts.
    lines += [
        "}",
        "",
        "",
        "def _check_prop(k: Any, x: Any, where: str) -> None:",
        '    """One property, checked precisely (raises MalformedFrame naming it)."""',
        "    if type(k) is not str:",
        '        raise fail(where, "map keys must be strings")',
    ]
    first = True
    for k, (t, _d) in spec["properties"].items():
        kw = "if" if first else "elif"
        first = False
        lines.append(f"    {kw} k == {k!r}:")
        lines.append(f"        {check_expr(t, 'x', 'x')}".replace("'x')", "where + '.' + k)"))
    lines += [
        "    else:",
        '        raise fail(where, f"unknown property {k!r}")',
        "",
        "",
        "_PROP_KIND: dict[str, int] = {",
    ]
    kinds = {"name": 0, "bool": 1, "u64": 2}
    lines += [f"    {k!r}: {kinds.get(t, 9)},  # {t}" for k, (t, _d) in spec["properties"].items()]
    lines += [
        "}",
        "",
        "",
        "def check_props(v: Any, where: str) -> dict[str, Any]:",
        '    """Validate a message properties map: known keys with their types only.',
        "",
        "    Runs per published message: the common valid case is a dict lookup and one",
        '    inline guard per key; anything else is checked (and reported) by _check_prop."""',
        "    if type(v) is not dict:",
        "        check_table(v, where)",
        "    kinds = _PROP_KIND",
        "    for k, x in v.items():",
        "        kind = kinds.get(k, 9) if type(k) is str else 9",
        "        if kind == 0:",
        "            if type(x) is str and len(x) <= NAME_FAST:",
        "                continue",
        "        elif kind == 1:",
        "            if x is True or x is False:",
        "                continue",
        "        elif kind == 2:",
        "            if type(x) is int and 0 <= x <= U64_MAX:",
        "                continue",
        "        _check_prop(k, x, where)",
        "    return v  # type: ignore[no-any-return]",
    ]
    # queue arguments: validated by the broker (a bad one is 400, not a malformed frame)
    lines += [
        "",
        "",
        "# ------------------------------------------------------------------ queue arguments",
        "QUEUE_ARGUMENT_TYPES: dict[str, str] = {",
    ]
    lines += [f"    {k!r}: {v[0]!r}," for k, v in spec["queue_arguments"].items()]
    lines += ["}"]
    lines += ["", "CONSUME_ARGUMENT_TYPES: dict[str, str] = {"]
    lines += [f"    {k!r}: {v[0]!r}," for k, v in spec["consume_arguments"].items()]
    lines += ["}"]
    # records
    lines += [
        "",
        "",
        "# ------------------------------------------------------------------ records",
    ]
    for rname, rec in spec["record"].items():
        lines += gen_record(camel(rname), rec["fields"], rec["doc"], rname)
    # frames
    lines += [
        "",
        "",
        "# ------------------------------------------------------------------ frames",
        "",
        "",
        "class Frame:",
        '    """Base of every frame: TYPE is the wire type byte, NAME the spec name."""',
        "",
        "    __slots__ = ()",
        "    TYPE: ClassVar[int]",
        "    NAME: ClassVar[str]",
        "    DIRECTION: ClassVar[str]",
        "",
        "    def to_wire(self) -> list[Any]:",
        "        raise NotImplementedError",
        "",
        "    @classmethod",
        "    def from_wire(cls, f: Any, where: str = '') -> Frame:",
        "        raise NotImplementedError",
    ]
    for fr in spec["frame"]:
        cv = [
            f"TYPE: ClassVar[int] = {fr['code']:#04x}",
            f"NAME: ClassVar[str] = {fr['name']!r}",
            f"DIRECTION: ClassVar[str] = {fr['direction']!r}",
        ]
        lines += gen_class(camel(fr["name"]), "Frame", fr["fields"], fr["doc"], cv, fr["name"])
    lines += ["", "", "FRAME_TYPES: dict[int, type[Frame]] = {"]
    lines += [f"    {fr['code']:#04x}: {camel(fr['name'])}," for fr in spec["frame"]]
    lines += ["}", ""]
    lines += [
        "CLIENT_FRAMES: frozenset[int] = frozenset({"
        + ", ".join(
            f"{fr['code']:#04x}" for fr in spec["frame"] if fr["direction"] in ("client", "both")
        )
        + "})"
    ]
    lines += [
        "SERVER_FRAMES: frozenset[int] = frozenset({"
        + ", ".join(
            f"{fr['code']:#04x}" for fr in spec["frame"] if fr["direction"] in ("server", "both")
        )
        + "})"
    ]
    lines += gen_lifecycle(spec)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- lifecycle and replies


def frame_names(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {fr["name"]: fr for fr in spec["frame"]}


def frame_set(spec: dict[str, Any], items: list[str], where: str) -> list[str]:
    """Frame names of a lifecycle ``frames`` list ("@client", "@server", "-name", names),
    in spec order."""
    frames = frame_names(spec)
    chosen: set[str] = set()
    for item in items:
        if item in ("@client", "@server"):
            side = item[1:]
            chosen |= {n for n, fr in frames.items() if fr["direction"] in (side, "both")}
        elif item.startswith("-"):
            if item[1:] not in frames:
                raise SystemExit(f"{where}: unknown frame {item[1:]!r}")
            chosen.discard(item[1:])
        elif item in frames:
            chosen.add(item)
        else:
            raise SystemExit(f"{where}: unknown frame {item!r}")
    return [n for n in frames if n in chosen]


def lifecycle_rows(spec: dict[str, Any], kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, state, row) for each role a ``receive``/``send``/``transition`` row covers,
    checked against the state list and the frame directions."""
    lc = spec["lifecycle"]
    states = {s["name"]: s["role"] for s in lc["state"]}
    frames = frame_names(spec)
    out = []
    for row in lc[kind]:
        roles = ("server", "client") if row["role"] == "both" else (row["role"],)
        where = f"lifecycle.{kind} {row['role']}/{row['state']}"
        if row["state"] not in states:
            raise SystemExit(f"{where}: unknown state")
        for role in roles:
            if states[row["state"]] not in (role, "both"):
                raise SystemExit(f"{where}: state is not a {role} state")
            if kind == "transition":
                if row["next"] not in states:
                    raise SystemExit(f"{where}: unknown next state {row['next']!r}")
                if row["event"] in ("send", "receive"):
                    sender = (
                        role
                        if row["event"] == "send"
                        else ("client" if role == "server" else "server")
                    )
                    if frames[row["frame"]]["direction"] not in (sender, "both"):
                        raise SystemExit(f"{where}: the {sender} never sends {row['frame']}")
            else:
                sender = role if kind == "send" else ("client" if role == "server" else "server")
                for n in frame_set(spec, row["frames"], where):
                    if frames[n]["direction"] not in (sender, "both"):
                        raise SystemExit(f"{where}: the {sender} never sends {n}")
            out.append((role, row["state"], row))
    return out


def state_member(name: str) -> str:
    return name.replace("-", "_").upper()


def gen_lifecycle(spec: dict[str, Any]) -> list[str]:
    lc = spec["lifecycle"]
    frames = frame_names(spec)
    lines = [
        "",
        "",
        "# ------------------------------------------------------------------ lifecycle",
        "",
        "",
        "class Role(enum.Enum):",
        '    """Which side of the connection a state machine runs for."""',
        "",
        '    CLIENT = "client"',
        '    SERVER = "server"',
        "",
        "",
        "class State(enum.Enum):",
        '    """Connection states (spec/PROTOCOL.md section 6)."""',
        "",
    ]
    for s in lc["state"]:
        lines.append(f"    {state_member(s['name'])} = {s['name']!r}  # {s['role']}: {s['doc']}")

    def key(role: str, state: str) -> str:
        return f"(Role.{role.upper()}, State.{state_member(state)})"

    def fset(names: list[str]) -> str:
        if not names:
            return "frozenset()"
        return "frozenset({" + ", ".join(f"{camel(n)}.TYPE" for n in names) + "})"

    for kind, const, doc in (
        ("receive", "RECEIVE_ALLOWED", "frame types that may be received"),
        (
            "send",
            "SEND_ALLOWED",
            "frame types that may be sent (anything else: LocalProtocolError)",
        ),
    ):
        lines += [
            "",
            f"# (role, state) -> {doc}",
            f"{const}: dict[tuple[Role, State], frozenset[int]] = {{",
        ]
        for role, state, row in lifecycle_rows(spec, kind):
            names = frame_set(spec, row["frames"], f"lifecycle.{kind}")
            lines.append(f"    {key(role, state)}: {fset(names)},")
        lines.append("}")
    dropped = [
        (r, s) for r, s, row in lifecycle_rows(spec, "receive") if row.get("otherwise") == "dropped"
    ]
    lines += [
        "",
        "# (role, state) where a frame not allowed is dropped instead of refused",
        "RECEIVE_DROPS: frozenset[tuple[Role, State]] = frozenset({"
        + ", ".join(key(r, s) for r, s in dropped)
        + "})",
    ]
    for event, const in (("receive", "ON_RECEIVE"), ("send", "ON_SEND")):
        lines += [
            "",
            f"# (role, state, {'received' if event == 'receive' else 'sent'} frame type) -> next state",
            f"{const}: dict[tuple[Role, State, int], State] = {{",
        ]
        for role, state, row in lifecycle_rows(spec, "transition"):
            if row["event"] == event:
                lines.append(
                    f"    (Role.{role.upper()}, State.{state_member(state)}, "
                    f"{camel(row['frame'])}.TYPE): State.{state_member(row['next'])},"
                )
        lines.append("}")
    # request -> reply
    lines += [
        "",
        "",
        "# ------------------------------------------------------------------ replies",
        "# request frame type -> the frame type of its success reply (besides ERROR)",
        "REPLIES: dict[int, int] = {",
    ]
    for req, rep in replies(spec).items():
        lines.append(f"    {camel(req)}.TYPE: {camel(rep)}.TYPE,")
    lines += ["}", "", "REPLY_CLASSES: dict[type[Frame], type[Frame]] = {"]
    for req, rep in replies(spec).items():
        lines.append(f"    {camel(req)}: {camel(rep)},")
    lines.append("}")
    del frames
    return lines


def replies(spec: dict[str, Any]) -> dict[str, str]:
    """The [replies] table, checked: every client frame with a rid is a request, every
    reply a server frame with a rid."""
    frames = frame_names(spec)
    table: dict[str, str] = spec["replies"]

    def has_rid(n: str) -> bool:
        return bool(frames[n]["fields"]) and frames[n]["fields"][0][0] == "rid"

    for req, rep in table.items():
        if req not in frames or rep not in frames:
            raise SystemExit(f"replies: unknown frame in {req} = {rep}")
        if frames[req]["direction"] != "client" or not has_rid(req):
            raise SystemExit(f"replies: {req} is not a client frame with a rid")
        if frames[rep]["direction"] != "server" or not has_rid(rep):
            raise SystemExit(f"replies: {rep} is not a server frame with a rid")
    for n, fr in frames.items():
        if fr["direction"] == "client" and has_rid(n) and n not in table:
            raise SystemExit(f"replies: request {n} has no reply")
    return {n: table[n] for n in frames if n in table}  # spec order


# ---------------------------------------------------------------- vectors


def to_wire_value(ftype: str, v: Any, spec: dict[str, Any]) -> Any:
    if ftype == "bytes":
        return v.encode() if isinstance(v, str) else bytes(v)
    if ftype == "binlist":
        return [to_wire_value("bytes", x, spec) for x in v]
    if ftype.startswith("list:"):
        rec = spec["record"][ftype[5:]]
        return [
            [to_wire_value(f[1], x, spec) for f, x in zip(rec["fields"], e, strict=False)]
            for e in v
        ]
    return v


def to_json_value(ftype: str, v: Any, spec: dict[str, Any]) -> Any:
    if ftype == "bytes":
        return {"$bin": (v.encode() if isinstance(v, str) else bytes(v)).hex()}
    if ftype == "binlist":
        return [to_json_value("bytes", x, spec) for x in v]
    if ftype.startswith("list:"):
        rec = spec["record"][ftype[5:]]
        return [
            {f[0]: to_json_value(f[1], x, spec) for f, x in zip(rec["fields"], e, strict=False)}
            for e in v
        ]
    return v


def gen_vectors(spec: dict[str, Any]) -> str:
    vecs = []
    for fr in spec["frame"]:
        ex = fr["example"]
        wire = [to_wire_value(f[1], v, spec) for f, v in zip(fr["fields"], ex, strict=True)]
        body = msgpack.packb(wire, use_bin_type=True)
        frame = struct.pack(">IB", len(body) + 1, fr["code"]) + body
        decoded = {
            f[0]: to_json_value(f[1], v, spec) for f, v in zip(fr["fields"], ex, strict=True)
        }
        vecs.append(
            {"type": fr["name"], "code": fr["code"], "hex": frame.hex(), "decoded": decoded}
        )
    doc = {
        "description": 'Valid frames: hex bytes on the wire <-> decoded fields. Bytes values are {"$bin": hex}. Generated from spec/protocol.toml.',
        "vectors": vecs,
    }
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


# ---------------------------------------------------------------- markdown


def fmt_default(d: Any) -> str:
    if d == "REQUIRED":
        return "required"
    return "`" + json.dumps(d) + "`"


def md_tables(spec: dict[str, Any]) -> dict[str, str]:
    t: dict[str, str] = {}
    rows = ["| type | name | direction | purpose |", "|---|---|---|---|"]
    for fr in spec["frame"]:
        rows.append(
            f"| `{fr['code']:#04x}` | {fr['name'].upper()} | {fr['direction']} | {fr['doc']} |"
        )
    t["frame-types"] = "\n".join(rows)
    parts = []
    for fr in spec["frame"]:
        parts.append(
            f"#### {fr['name'].upper()} (`{fr['code']:#04x}`, {fr['direction']})\n\n{fr['doc']}\n"
        )
        if fr["fields"]:
            parts.append("| # | field | type | default | meaning |\n|---|---|---|---|---|")
            for i, (n, ty, d, desc) in enumerate(fr["fields"]):
                tyd = f"array of {ty[5:]} records" if ty.startswith("list:") else WIRE_TYPES[ty]
                parts.append(f"| {i} | `{n}` | {tyd} | {fmt_default(d)} | {desc} |")
        else:
            parts.append("Empty body: the msgpack empty array `0x90`.")
        parts.append("")
    for rname, rec in spec["record"].items():
        parts.append(f"#### Record `{rname}`\n\n{rec['doc']}\n")
        parts.append("| # | field | type | default | meaning |\n|---|---|---|---|---|")
        for i, (n, ty, d, desc) in enumerate(rec["fields"]):
            parts.append(f"| {i} | `{n}` | {WIRE_TYPES[ty]} | {fmt_default(d)} | {desc} |")
        parts.append("")
    t["frames"] = "\n".join(parts).rstrip()
    rows = ["| code | name | fatal | retriable | origin | meaning |", "|---|---|---|---|---|---|"]
    for e in spec["error"]:
        rows.append(
            f"| {e['code']} | `{e['name']}` | {'yes' if e['fatal'] else 'no'} | "
            f"{'yes' if e['retriable'] else 'no'} | {e['origin']} | {e['doc']} |"
        )
    t["errors"] = "\n".join(rows)
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for k, (ty, desc) in spec["properties"].items():
        rows.append(f"| `{k}` | {WIRE_TYPES[ty]} | {desc} |")
    t["properties"] = "\n".join(rows)
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for k, (ty, desc) in spec["queue_arguments"].items():
        rows.append(f"| `{k}` | {WIRE_TYPES.get(ty, ty)} | {desc} |")
    t["queue-arguments"] = "\n".join(rows)
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for k, (ty, desc) in spec["consume_arguments"].items():
        rows.append(f"| `{k}` | {WIRE_TYPES.get(ty, ty)} | {desc} |")
    t["consume-arguments"] = "\n".join(rows)
    t.update(md_lifecycle(spec))
    return t


def md_frames_text(row: dict[str, Any]) -> str:
    """How a lifecycle row's frame set reads in the tables ("every client frame except AUTH")."""
    if "accepted" in row:
        return str(row["accepted"])
    items = row["frames"]
    names = [n.upper() for n in items if not n.startswith(("@", "-"))]
    minus = [n[1:].upper() for n in items if n.startswith("-")]
    sides = [n[1:] for n in items if n.startswith("@")]
    if sides:
        text = f"every {sides[0]} frame"
        if minus:
            text += " except " + (
                ", ".join(minus[:-1]) + " and " + minus[-1] if len(minus) > 1 else minus[0]
            )
        return text
    return ", ".join(names) if names else "none"


def md_lifecycle(spec: dict[str, Any]) -> dict[str, str]:
    lc = spec["lifecycle"]
    for kind in ("receive", "send", "transition"):
        lifecycle_rows(spec, kind)  # validate
    t: dict[str, str] = {}
    rows = ["| state | role | meaning |", "|---|---|---|"]
    for s in lc["state"]:
        rows.append(f"| `{state_member(s['name'])}` | {s['role']} | {s['doc']} |")
    t["lifecycle-states"] = "\n".join(rows)
    rows = ["| role | state | frames accepted | anything else |", "|---|---|---|---|"]
    for r in lc["receive"]:
        rows.append(
            f"| {r['role']} | `{state_member(r['state'])}` | {md_frames_text(r)} | "
            f"{r['otherwise']} |"
        )
    t["lifecycle-receive"] = "\n".join(rows)
    rows = ["| role | state | frames it may send |", "|---|---|---|"]
    for r in lc["send"]:
        rows.append(f"| {r['role']} | `{state_member(r['state'])}` | {md_frames_text(r)} |")
    t["lifecycle-send"] = "\n".join(rows)
    rows = ["| role | state | event | next state |", "|---|---|---|---|"]
    for r in lc["transition"]:
        event = r.get("doc") or f"{r['event']} {r['frame'].upper()}"
        rows.append(
            f"| {r['role']} | `{state_member(r['state'])}` | {event} | "
            f"`{state_member(r['next'])}` |"
        )
    fatal = ", ".join(str(e["code"]) for e in spec["error"] if e["fatal"])
    rows.append(f"| both | any | send or receive ERROR with a fatal code ({fatal}) | `CLOSED` |")
    rows.append(
        "| both | any | a protocol error is detected in received bytes | `CLOSED` (the "
        "server sends the fatal ERROR; in the Python API the application calls "
        "`send(Error(...))` or `fail()`) |"
    )
    t["lifecycle-transitions"] = "\n".join(rows)
    rows = ["| request | success reply |", "|---|---|"]
    for req, rep in replies(spec).items():
        rows.append(f"| `{req.upper()}` | `{rep.upper()}` |")
    t["replies"] = "\n".join(rows)
    return t


def render_doc(current: str, tables: dict[str, str]) -> str:
    for name, body in tables.items():
        pat = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: {name} -->)", re.S
        )
        if not pat.search(current):
            raise SystemExit(f"spec/PROTOCOL.md lacks the GENERATED markers for {name}")

        def fill(m: re.Match[str], b: str = body) -> str:
            return m.group(1) + b + "\n" + m.group(2)

        current = pat.sub(fill, current)
    return current


def main() -> int:
    check = "--check" in sys.argv
    spec = tomllib.loads(SPEC.read_text())
    outputs = {GEN_PY: gen_python(spec), VECTORS: gen_vectors(spec)}
    if DOC.exists():
        outputs[DOC] = render_doc(DOC.read_text(), md_tables(spec))
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run python tools/gen_protocol.py)")
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
