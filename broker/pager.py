"""Message bodies beyond the memory budget live in page files and are read back when due.

A queue keeps its head in memory and, once the broker's ready bodies pass the budget, its
tail on disk (``broker.queue``): the tail's bodies are appended to a page file and dropped
from memory; ``take`` reads them back in one batch when they reach the head. New
publishes to a queue that has a paged tail go straight to disk, so a backlog of any size
costs memory only for its metadata.

Page files are a cache, not the durable copy (the write-ahead log and snapshots are):
they are never fsynced and the directory is wiped at startup. A page file is deleted as
soon as no message refers to it (``PageFile.__del__``: messages hold their page as a
``(file, offset, body length, headers length)`` tuple, so reference counting tracks
liveness for free).

A message's ``headers`` (up to max_header_bytes each, and counted in ``Message.size``)
are paged with its body: encoded after it in the page, and dropped from the message's
properties (replaced by a copy without them, never changed in place) until ``load``
brings both back. Code that needs the properties of a message that may be paged reads
them with :meth:`Pager.properties`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from conveyor.broker.message import Message

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

PAGE_FILE_BYTES = 64 << 20


def _unpack(data: bytes) -> Any:
    """Headers as the codec decoded them on input (protocol.codec)."""
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)


class PageFile:
    """One append-only page file; unlinked when the last message paged into it dies."""

    __slots__ = ("fd", "path", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = 0

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            os.close(self.fd)
            os.unlink(self.path)


class Pager:
    """Writes bodies out, reads them back, and accounts the bodies held in memory."""

    def __init__(self, directory: Path, budget: int, file_bytes: int = PAGE_FILE_BYTES) -> None:
        self.dir = directory
        self.budget = budget
        self.file_bytes = file_bytes
        if directory.exists():
            shutil.rmtree(directory)  # a previous run's cache: the log is the durable copy
        directory.mkdir(parents=True)
        self._file: PageFile | None = None
        self._next = 1
        # Bytes of ready-message bodies in memory (maintained by the queues).
        self.resident = 0
        # Messages queued to be paged at the next flush (their body is still in memory).
        self.pending: list[Message] = []
        self.paged_out = 0  # counters for listings and tests
        self.paged_in = 0

    # ------------------------------------------------------------------ writing
    def write(self, messages: list[Message]) -> None:
        """Give every message a page (once) and drop its body and headers from memory."""
        chunks: list[bytes] = []
        f = self._file
        size = 0
        for m in messages:
            body = m.body
            if body is None:
                continue
            if m.page is None:
                headers = m.properties.get("headers") if m.properties else None
                packed = _packb(headers) if headers else b""
                if f is None or f.size + size >= self.file_bytes:
                    if chunks:
                        self._append(f, chunks, size)  # type: ignore[arg-type]
                        chunks, size = [], 0
                    f = self._file = PageFile(self.dir / f"page-{self._next:08d}.dat")
                    self._next += 1
                m.page = (f, f.size + size, len(body), len(packed))
                chunks.append(body)
                size += len(body)
                if packed:
                    chunks.append(packed)
                    size += len(packed)
        if chunks:
            self._append(f, chunks, size)  # type: ignore[arg-type]
        # One copy without headers per properties dict (a run of messages shares one).
        bare: dict[int, dict[str, Any]] = {}
        for m in messages:
            page = m.page
            if page is not None:
                m.body = None  # after the page is set: a snapshot thread may be reading
                props = m.properties
                if page[3] and "headers" in props:
                    copy = bare.get(id(props))
                    if copy is None:
                        copy = bare[id(props)] = {k: v for k, v in props.items() if k != "headers"}
                    m.properties = copy
        self.paged_out += len(messages)

    @staticmethod
    def _append(f: PageFile, chunks: list[bytes], size: int) -> None:
        data = memoryview(b"".join(chunks))
        pos = f.size
        while data:
            n = os.pwrite(f.fd, data, pos)
            data = data[n:]
            pos += n
        f.size += size

    def flush(self) -> None:
        """Page out what enqueue deferred (one write for a whole pump's publishes)."""
        if self.pending:
            batch, self.pending = self.pending, []
            self.write(batch)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def read(m: Message) -> bytes:
        """The body of ``m``, from memory or its page (safe from any thread)."""
        body = m.body
        if body is not None:
            return body
        assert m.page is not None
        return Pager.read_page(m.page)

    @staticmethod
    def read_page(page: tuple[PageFile, int, int, int]) -> bytes:
        f, offset, length, _headers = page
        return os.pread(f.fd, length, offset)

    @staticmethod
    def properties(m: Message) -> dict[str, Any]:
        """The full properties of ``m``: with its headers read back from its page if they
        were paged (the message itself is left as it is)."""
        return Pager.page_properties(m.properties, m.page)

    @staticmethod
    def page_properties(
        props: dict[str, Any], page: tuple[PageFile, int, int, int] | None
    ) -> dict[str, Any]:
        """``props`` with the headers stored in ``page`` if they are not in it (safe from
        any thread: snapshots)."""
        if page is None or not page[3] or "headers" in props:
            return props
        f, offset, length, hlen = page
        return {**props, "headers": _unpack(os.pread(f.fd, hlen, offset + length))}

    def load(self, messages: list[Message]) -> None:
        """Bring bodies (and paged headers) back into memory; adjacent pages are read with
        one call."""
        todo = [(m, m.page) for m in messages if m.body is None and m.page is not None]
        todo.sort(key=lambda t: (id(t[1][0]), t[1][1]))
        i = 0
        while i < len(todo):
            f, start, length, hlen = todo[i][1]
            j, end = i + 1, start + length + hlen
            while j < len(todo) and end - start < (4 << 20):
                f2, off, n, h = todo[j][1]
                if f2 is not f or off != end:
                    break
                end += n + h
                j += 1
            data = os.pread(f.fd, end - start, start)
            for m, (_f, off, n, h) in todo[i:j]:
                o = off - start
                m.body = data[o : o + n]
                if h and "headers" not in m.properties:
                    m.properties = {**m.properties, "headers": _unpack(data[o + n : o + n + h])}
            i = j
        self.paged_in += len(todo)

    def over_budget(self) -> bool:
        return self.resident > self.budget

    def close(self) -> None:
        self._file = None
        self.pending.clear()
