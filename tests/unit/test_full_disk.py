"""The write path on a full disk, below the broker: the disk-free guard's accounting, a
stream segment roll that cannot create its file, the groups file's temp copy (a real
small ext4, tests/loopfs.py; the broker-level behaviour is
tests/integration/test_disk_full.py)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from conveyor.broker.flow import WATERMARK_INTERVAL, Watermarks, disk_free
from conveyor.broker.stream import _write_atomic
from conveyor.broker.stream_store import StreamLog
from tests.loopfs import fill, small_fs_or_skip


def test_guard_counts_written_bytes_against_the_last_sample(tmp_path: Path) -> None:
    free = disk_free(str(tmp_path))
    assert free is not None and free > 1 << 20
    limit = free // 2
    wm = Watermarks(1 << 60, disk_free_limit=limit, data_dir=str(tmp_path))
    assert wm.reason(time.monotonic()) == "" and wm.refusal == ""
    wm.debit(free // 4)  # still above the limit by this count
    assert wm.refusal == ""
    wm.debit(free // 3)  # now below: refused at once, not at the next sample
    assert "disk_free_limit" in wm.refusal and wm.reason(time.monotonic()) == "disk"
    assert wm.free is not None and wm.free < limit
    # The next sample (a second later) sees the real free space: the refusal clears.
    assert wm.refusing(time.monotonic() + WATERMARK_INTERVAL) == ""
    assert wm.free is not None and wm.free > limit


def test_guard_off_counts_nothing(tmp_path: Path) -> None:
    wm = Watermarks(1 << 60, disk_free_limit=0, data_dir=str(tmp_path))
    wm.debit(1 << 62)
    assert wm.refusal == "" and wm.free is None


def _item(i: int, size: int) -> tuple[int, str, str, dict[str, object], bytes]:
    return (1000 + i, "", "s", {}, bytes([65 + i]) * size)


def test_segment_roll_failing_with_enospc_leaves_the_log_usable(tmp_path: Path) -> None:
    """Creating the next segment fails (no inodes left: ENOSPC): the append fails, the log
    stays on its segment, and the next append after space returns rolls and succeeds."""
    with small_fs_or_skip(tmp_path, size=16 << 20, inodes=256) as mnt:
        slog = StreamLog(mnt / "s", segment_bytes=4096, fsync="never").open()
        assert slog.append([_item(0, 5000)]) == 0  # the segment is now past its size
        files = sorted(p.name for p in (mnt / "s").iterdir())
        used: list[Path] = []
        for i in range(10_000):  # bounded: 256 inodes
            p = mnt / f"inode-{i}"
            try:
                p.touch()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            used.append(p)
        with pytest.raises(OSError) as info:
            slog.append([_item(1, 100)])
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (mnt / "s").iterdir()) == files
        assert (len(slog.segments), slog.head) == (1, 1)
        for p in used:
            p.unlink()
        assert slog.append([_item(2, 100)]) == 1  # rolls now
        assert len(slog.segments) == 2
        assert [e[5][:1] for e in slog.read(0, 10)] == [b"A", b"C"]
        slog.close()
        again = StreamLog(mnt / "s", segment_bytes=4096, fsync="never").open()
        slog_entries = again.read(0, 10)
        again.close()
        assert [(e[0], e[5][:1]) for e in slog_entries] == [(0, b"A"), (1, b"C")]


def test_groups_file_write_on_a_full_disk_leaves_no_temp_copy(tmp_path: Path) -> None:
    """The consumer-group offsets are replaced atomically through ``groups.tmp``: when
    the disk is full, the partial copy is removed and the old file stays as it was."""
    with small_fs_or_skip(tmp_path, size=16 << 20) as mnt:
        path = mnt / "groups"
        _write_atomic(path, b"old")
        fill(mnt / "filler")
        with pytest.raises(OSError) as info:
            _write_atomic(path, b"x" * (1 << 20))
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in mnt.iterdir() if p.name != "lost+found") == [
            "filler",
            "groups",
        ]
        assert path.read_bytes() == b"old"
