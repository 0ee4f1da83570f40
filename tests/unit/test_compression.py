"""Optional zstd compression: COMPRESSED frames (spec/PROTOCOL.md "Compressed frames")
and compressed stream records (broker/stream_store.py, REC_STREAM_ZSTD)."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import zstandard

import conveyor.protocol._generated as g
from conveyor.broker import stream_store
from conveyor.broker.options import QueueOptions
from conveyor.protocol import InvalidArgument, compress_frame, encode_fields
from conveyor.protocol.codec import Decoder
from conveyor.protocol.connection import Connection, Role

CAP = 1 << 20


def _deliver_batch(n: int, size: int = 100) -> list[object]:
    return ["ctag", [[i + 1, False, "", "q", {}, b"x" * size, 1] for i in range(n)]]


def _compressed(inner_type: int, data: bytes) -> bytes:
    body = msgpack.packb([inner_type, data], use_bin_type=True)
    return struct.pack(">IB", len(body) + 1, g.Compressed.TYPE) + body


def _client_decoder(compression: bool = True, cap: int = CAP) -> Decoder:
    dec = Decoder(cap, g.SERVER_FRAMES)
    dec.compression = compression
    return dec


def test_round_trip_deliver_batch_through_decoder() -> None:
    plain = encode_fields(g.DeliverBatch.TYPE, _deliver_batch(200))
    wrapped = compress_frame(plain)
    assert wrapped[4] == g.Compressed.TYPE
    assert len(wrapped) < len(plain) // 10
    dec = _client_decoder()
    # any fragmentation decodes to the same inner frame
    frames = [f for i in range(0, len(wrapped), 7) for f in dec.feed(wrapped[i : i + 7])]
    assert frames == _client_decoder().feed(plain)
    assert type(frames[0]) is g.DeliverBatch and len(frames[0].entries) == 200


def test_round_trip_publish_batch_on_the_server_side() -> None:
    fields = [1, [["", "q", {}, b"y" * 50, False] for _ in range(100)]]
    wrapped = compress_frame(encode_fields(g.PublishBatch.TYPE, fields))
    assert wrapped[4] == g.Compressed.TYPE
    conn = Connection(Role.SERVER)
    conn.compression = True
    dec = conn._decoder
    (frame,) = dec.feed(wrapped)
    assert type(frame) is g.PublishBatch and frame.first_seq == 1 and len(frame.entries) == 100


def test_small_or_incompressible_frames_stay_plain() -> None:
    small = encode_fields(g.DeliverBatch.TYPE, _deliver_batch(2, 10))
    assert compress_frame(small) == small
    import os

    noise = encode_fields(
        g.DeliverBatch.TYPE,
        ["t", [[1, False, "", "q", {}, os.urandom(4000), 1], [2, False, "", "q", {}, b"", 1]]],
    )
    assert compress_frame(noise) == noise


def test_not_negotiated_is_unexpected_frame() -> None:
    wrapped = compress_frame(encode_fields(g.DeliverBatch.TYPE, _deliver_batch(200)))
    with pytest.raises(g.UnexpectedFrame) as err:
        _client_decoder(compression=False).feed(wrapped)
    assert err.value.code == 503
    # the client's state machine: COMPRESSED before/without OPEN_OK negotiation
    with pytest.raises(g.UnexpectedFrame):
        Connection(Role.CLIENT)._decoder.feed(wrapped)


def test_inner_type_must_be_a_batch_the_receiver_accepts() -> None:
    body = msgpack.packb(_deliver_batch(20), use_bin_type=True)
    # DELIVER_BATCH to a server: wrong direction
    server = Decoder(CAP, g.CLIENT_FRAMES)
    server.compression = True
    with pytest.raises(g.UnexpectedFrame):
        server.feed(_compressed(g.DeliverBatch.TYPE, zstandard.compress(body)))
    # not a batch frame (nested COMPRESSED, CLOSE)
    for inner in (g.Compressed.TYPE, g.Close.TYPE):
        with pytest.raises(g.UnexpectedFrame):
            _client_decoder().feed(_compressed(inner, zstandard.compress(body)))


def test_decompression_bomb_is_refused_before_allocating() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(bomb) < 8192  # 64 MiB declared in a tiny frame
    with pytest.raises(g.FrameTooLarge) as err:
        _client_decoder(cap=CAP).feed(_compressed(g.DeliverBatch.TYPE, bomb))
    assert err.value.code == 502
    # just over the cap is refused too; at the cap it is decoded (then checked as a frame)
    over = zstandard.compress(b"\0" * (CAP + 1))
    with pytest.raises(g.FrameTooLarge):
        _client_decoder(cap=CAP).feed(_compressed(g.DeliverBatch.TYPE, over))


def test_zstd_frame_without_content_size_is_refused() -> None:
    body = msgpack.packb(_deliver_batch(50), use_bin_type=True)
    data = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    with pytest.raises(g.FrameTooLarge):
        _client_decoder().feed(_compressed(g.DeliverBatch.TYPE, data))


def test_garbage_and_lying_content_size_are_malformed() -> None:
    with pytest.raises(g.MalformedFrame):
        _client_decoder().feed(_compressed(g.DeliverBatch.TYPE, b"not zstd at all"))
    good = zstandard.compress(msgpack.packb(_deliver_batch(50), use_bin_type=True))
    with pytest.raises(g.MalformedFrame):
        _client_decoder().feed(_compressed(g.DeliverBatch.TYPE, good[:-8]))  # truncated
    # decompresses fine but is not the inner frame's field list
    with pytest.raises(g.MalformedFrame):
        _client_decoder().feed(_compressed(g.DeliverBatch.TYPE, zstandard.compress(b"\xc1" * 2000)))


def test_stream_compression_argument() -> None:
    assert QueueOptions().stream_compression == "none"
    assert QueueOptions({"stream_compression": "zstd"}).stream_compression == "zstd"
    with pytest.raises(InvalidArgument):
        QueueOptions({"stream_compression": "gzip"})


def _entries(n: int, start: int = 0) -> list[tuple[int, str, str, dict[str, object], bytes]]:
    return [
        (1000 + i, "", "s", {}, b'{"n": %d, "pad": "%s"}' % (i, b"abc" * 60))
        for i in range(start, start + n)
    ]


def test_stream_records_compressed_then_plain_across_reopen(tmp_path: Path) -> None:
    plain_dir, zstd_dir = tmp_path / "plain", tmp_path / "zstd"
    for d, comp in ((plain_dir, "none"), (zstd_dir, "zstd")):
        log = stream_store.StreamLog(d, fsync="never", compression=comp).open()
        log.append(_entries(3000))
        log.close()
    assert (
        stream_store.StreamLog(zstd_dir).open().disk_bytes * 5
        < stream_store.StreamLog(plain_dir).open().disk_bytes
    )
    # the setting changes across a reopen: both record types in one segment
    log = stream_store.StreamLog(zstd_dir, fsync="never", compression="none").open()
    log.append(_entries(500, 3000))
    log.close()
    log = stream_store.StreamLog(zstd_dir, fsync="never", compression="zstd").open()
    assert log.truncated == ""
    got: list[stream_store.Entry] = []
    while len(got) < 3500:
        batch = log.read(len(got), 1000)
        assert batch, f"read stopped at {len(got)}"
        got.extend(batch)
    want = _entries(3500)
    assert [e[0] for e in got] == list(range(3500))
    assert [(e[1], e[5]) for e in got] == [(w[0], w[4]) for w in want]
    log.close()


def test_corrupt_compressed_record_is_cut_on_open(tmp_path: Path) -> None:
    log = stream_store.StreamLog(tmp_path / "s", fsync="never", compression="zstd").open()
    log.append(_entries(100))
    log.append(_entries(100, 100))
    seg = log.segments[-1].path
    log.close()
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # inside the second record's compressed payload: CRC mismatch
    seg.write_bytes(bytes(data))
    log = stream_store.StreamLog(tmp_path / "s", fsync="never").open()
    assert log.head == 100 and "checksum" in log.truncated
    log.close()
