"""A real small file system for full-disk tests: an ext4 image on a loop device.

``mounted_ext4`` creates the image (sparse file, ``mkfs.ext4``), attaches it to a free loop
device, mounts it and, on exit, unmounts it and detaches the device. It needs root (or
CAP_SYS_ADMIN) and e2fsprogs; when either is missing it raises ``LoopUnavailable`` with
the reason, which the ``small_fs`` fixtures turn into a skip.

The image is made with ``-m 0`` (no blocks reserved for root): the broker runs as root
and would otherwise write into the reserve after the free space it measures (f_bavail)
reached zero, so "full" would mean two different things.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


class LoopUnavailable(Exception):
    """Mounting a loop file system is not possible here (the reason is the message)."""


# The tools live in sbin, which a non-login PATH may lack.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _quiet(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PATH=_PATH),
    )


def _run(*cmd: str) -> str:
    proc = _quiet(*cmd)
    if proc.returncode != 0:
        raise LoopUnavailable(f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


@contextmanager
def mounted_ext4(workdir: Path, size: int = 64 << 20, inodes: int = 0) -> Iterator[Path]:
    """Yield the mount point of a fresh ``size``-byte ext4 file system (with about
    ``inodes`` inodes if given: creating files then runs out of space early)."""
    if os.geteuid() != 0:
        raise LoopUnavailable("mounting a loop file system needs root")
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool, path=_PATH) is None:
            raise LoopUnavailable(f"{tool} is not installed (Debian: e2fsprogs, mount)")
    image = workdir / "fs.img"
    mnt = workdir / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", *(["-N", str(inodes)] if inodes else []), str(image))
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", dev, str(mnt))
    except LoopUnavailable:
        _quiet("losetup", "-d", dev)
        raise
    try:
        yield mnt
    finally:
        _unmount(mnt, dev)
        image.unlink(missing_ok=True)


def _unmount(mnt: Path, dev: str) -> None:
    """Unmount (retrying while a just-killed process still holds files) and detach."""
    for _ in range(50):
        if _quiet("umount", str(mnt)).returncode == 0:
            break
        time.sleep(0.1)
    else:
        _quiet("umount", "-l", str(mnt))
    _quiet("losetup", "-d", dev)


def free_bytes(path: Path) -> int:
    """What the broker's disk-free guard measures: bytes available on ``path``'s fs."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> int:
    """Append to ``path`` (a file on the small fs) until about ``leave`` bytes are free,
    or, with ``leave`` 0, until writes fail with ENOSPC; returns the bytes written."""
    written = 0
    step = 1 << 20
    block = b"\xa5" * step
    with open(path, "ab", buffering=0) as f:
        for _ in range(1 << 16):  # bounded: a 64 MiB fs takes at most 16k 4 KiB writes
            n = step
            if leave:
                n = min(step, free_bytes(path.parent) - leave)
                if n < 4096:
                    break
            try:
                written += f.write(block[:n]) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if step > 4096:
                    step = 4096  # then the last few blocks
                    continue
                break
        os.fsync(f.fileno())
    return written


@contextmanager
def small_fs_or_skip(workdir: Path, **kw: Any) -> Iterator[Path]:
    """``mounted_ext4``, or a pytest skip naming why it cannot be mounted."""
    cm = mounted_ext4(workdir, **kw)
    try:
        mnt = cm.__enter__()
    except LoopUnavailable as exc:
        pytest.skip(f"cannot mount a small file system for the full-disk tests: {exc}")
    try:
        yield mnt
    finally:
        cm.__exit__(None, None, None)
