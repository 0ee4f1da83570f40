"""Message bodies beyond the memory budget live in page files and are read back when due.

A queue keeps its head in memory and, once the broker's ready bodies pass the budget, its
tail on disk (``broker.queue``): the tail's bodies are appended to a page file and dropped
from memory; ``take`` reads them back in one batch when they reach the head. New
publishes to a queue that has a paged tail go straight to disk, so a backlog of any size
costs memory only for its metadata.

Page files are a cache, not the durable copy (the write-ahead log and snapshots are):
they are never fsynced and the directory is wiped at startup. A page file is deleted as
soon as no message refers to it (``PageFile.__del__``: messages hold their page as a
``(file, offset, length)`` tuple, so reference counting tracks liveness for free).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.message import Message

PAGE_FILE_BYTES = 64 << 20


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
        """Give every message a page (once) and drop its body from memory."""
        chunks: list[bytes] = []
        f = self._file
        size = 0
        for m in messages:
            body = m.body
            if body is None:
                continue
            if m.page is None:
                if f is None or f.size + size >= self.file_bytes:
                    if chunks:
                        self._append(f, chunks, size)  # type: ignore[arg-type]
                        chunks, size = [], 0
                    f = self._file = PageFile(self.dir / f"page-{self._next:08d}.dat")
                    self._next += 1
                m.page = (f, f.size + size, len(body))
                chunks.append(body)
                size += len(body)
        if chunks:
            self._append(f, chunks, size)  # type: ignore[arg-type]
        for m in messages:
            if m.page is not None:
                m.body = None  # after the page is set: a snapshot thread may be reading
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
    def read_page(page: tuple[PageFile, int, int]) -> bytes:
        f, offset, length = page
        return os.pread(f.fd, length, offset)

    def load(self, messages: list[Message]) -> None:
        """Bring bodies back into memory; adjacent pages are read with one call."""
        todo = [(m, m.page) for m in messages if m.body is None and m.page is not None]
        todo.sort(key=lambda t: (id(t[1][0]), t[1][1]))
        i = 0
        while i < len(todo):
            f, start, length = todo[i][1]
            j, end = i + 1, start + length
            while j < len(todo) and end - start < (4 << 20):
                f2, off, n = todo[j][1]
                if f2 is not f or off != end:
                    break
                end += n
                j += 1
            data = os.pread(f.fd, end - start, start)
            for m, (_f, off, n) in todo[i:j]:
                m.body = data[off - start: off - start + n]
            i = j
        self.paged_in += len(todo)

    def over_budget(self) -> bool:
        return self.resident > self.budget

    def close(self) -> None:
        self._file = None
        self.pending.clear()
