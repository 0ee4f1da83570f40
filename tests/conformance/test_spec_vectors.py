"""Sanity of the spec itself: the vectors agree with protocol.toml and with an independent codec.

No broker here: spec/vectors/frames.json must decode with tests/conformance/wire.py (which
only reads protocol.toml), re-encode to the same bytes, and use the type codes of the toml;
spec/vectors/invalid.json must be rejected (or, for partial inputs, not yet decided) by the
same strict decoder with the code the vector names.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conformance import wire

FRAME_VECTORS = json.loads((wire.SPEC_DIR / "vectors" / "frames.json").read_text())
INVALID = json.loads((wire.SPEC_DIR / "vectors" / "invalid.json").read_text())


def _from_json(v: Any) -> Any:
    """frames.json value -> Python value ({"$bin": hex} -> bytes)."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def _accepting_side(direction: str) -> str:
    """The decoder role that receives a frame of this direction."""
    return "client" if direction == "client" else "server"


def test_every_toml_frame_has_exactly_one_vector() -> None:
    names = [v["type"] for v in FRAME_VECTORS["vectors"]]
    assert sorted(names) == sorted(wire.FRAMES), "frames.json and protocol.toml disagree"
    assert len(set(names)) == len(names)


def test_frame_type_codes_are_unique_and_grouped() -> None:
    codes = [f.code for f in wire.FRAMES.values()]
    assert len(set(codes)) == len(codes)
    # PROTOCOL.md section 8: 0x01-0x09, 0x10-0x1A, 0x20-0x25, 0x30-0x3D.
    groups = [range(0x01, 0x0A), range(0x10, 0x1B), range(0x20, 0x26), range(0x30, 0x3E)]
    for c in codes:
        assert any(c in g for g in groups), f"type code {c:#04x} outside the documented groups"


def test_protocol_md_frame_table_matches_toml() -> None:
    """The generated frame-type table of PROTOCOL.md lists the toml's codes and directions."""
    md = (wire.SPEC_DIR / "PROTOCOL.md").read_text()
    rows = re.findall(r"^\| `0x([0-9a-f]{2})` \| (\w+) \| (\w+) \|", md, re.MULTILINE)
    table = {name.lower(): (int(hexcode, 16), direction) for hexcode, name, direction in rows}
    assert table == {f.name: (f.code, f.direction) for f in wire.FRAMES.values()}


def test_protocol_md_error_table_matches_toml() -> None:
    md = (wire.SPEC_DIR / "PROTOCOL.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \| (yes|no) \|", md, re.MULTILINE)
    table = {int(c): (name, fatal == "yes") for c, name, fatal in rows}
    assert table == {e["code"]: (e["name"], e["fatal"]) for e in wire.SPEC["error"]}


@pytest.mark.parametrize("vec", FRAME_VECTORS["vectors"], ids=lambda v: v["type"])
def test_frames_json_vector(vec: dict[str, Any]) -> None:
    spec = wire.FRAMES[vec["type"]]
    raw = bytes.fromhex(vec["hex"])
    assert vec["code"] == spec.code, "vector code differs from protocol.toml"
    assert raw[4] == spec.code, "type byte differs from protocol.toml"
    frame = wire.decode_one(raw, _accepting_side(spec.direction))
    assert frame.kind == vec["type"]
    assert frame.fields == _from_json(vec["decoded"])
    # Every field is present in the vector, so re-encoding must give the same bytes.
    assert wire.encode_fields(vec["type"], **_from_json(vec["decoded"])) == raw


@pytest.mark.parametrize("vec", FRAME_VECTORS["vectors"], ids=lambda v: v["type"])
def test_frames_json_wrong_direction_is_unexpected(vec: dict[str, Any]) -> None:
    spec = wire.FRAMES[vec["type"]]
    if spec.direction == "both":
        pytest.skip("both directions may send it")
    other = "server" if spec.direction == "client" else "client"
    with pytest.raises(wire.WireError) as exc:
        wire.decode_one(bytes.fromhex(vec["hex"]), other)
    assert exc.value.code == wire.UNEXPECTED_FRAME


def test_server_frame_vectors_fill_defaults_when_trailing_fields_omitted() -> None:
    """A frame with only its required fields decodes with the toml defaults filled in."""
    for vec in FRAME_VECTORS["vectors"]:
        spec = wire.FRAMES[vec["type"]]
        decoded = _from_json(vec["decoded"])
        required = [decoded[f.name] for f in spec.fields if f.required]
        if any(isinstance(v, list) and v and isinstance(v[0], dict) for v in required):
            continue  # records given as objects; covered by the full vectors
        frame = wire.decode_one(wire.encode(spec.name, *required), _accepting_side(spec.direction))
        for f in spec.fields[spec.n_required :]:
            assert frame[f.name] == f.default, (spec.name, f.name)


_FRAME_STAGE = [v for v in INVALID["vectors"] if v["stage"] == "frame"]
_PARTIAL = [v for v in INVALID["vectors"] if v["stage"] == "partial"]


def test_invalid_json_decoder_settings_match_toml() -> None:
    assert INVALID["decoder"] == {"max_frame_size": wire.MAX_FRAME_SIZE_DEFAULT, "accept": "client"}
    for v in INVALID["vectors"]:
        if v["stage"] in ("frame", "preamble"):
            assert wire.code(v["error"]) == v["code"], v["name"]


@pytest.mark.parametrize("vec", _FRAME_STAGE, ids=lambda v: v["name"])
def test_invalid_json_rejected_by_independent_decoder(vec: dict[str, Any]) -> None:
    dec = wire.Decoder(INVALID["decoder"]["max_frame_size"], "client")
    with pytest.raises(wire.WireError) as exc:
        dec.feed(bytes.fromhex(vec["hex"]))
    assert exc.value.code == vec["code"], str(exc.value)


@pytest.mark.parametrize("vec", _PARTIAL, ids=lambda v: v["name"])
def test_partial_json_undecided_by_independent_decoder(vec: dict[str, Any]) -> None:
    dec = wire.Decoder(INVALID["decoder"]["max_frame_size"], "client")
    assert dec.feed(bytes.fromhex(vec["hex"])) == []
