"""Startup recovery and background snapshots around the write-ahead log.

Startup = newest valid snapshot + replay of the newer log (broker.journal.Replay).
A snapshot is taken when the log written since the last one passes ``snapshot_bytes``
(or twice the last snapshot's size, whichever is larger, so a large backlog is not
rewritten over and over) or ``snapshot_interval_ms`` has passed with new records. It is
read back and verified; only then are the snapshot before the previous one and the
segments before the previous one deleted. So two generations stay on disk: if the newest
snapshot is damaged later, recovery falls back to the previous one and the log after it,
and disk use tracks the live backlog (twice over at most), not history.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import time
from pathlib import Path
from typing import IO

from conveyor.broker.config import Config
from conveyor.broker.core import Broker
from conveyor.broker.journal import Replay, snapshot_entries, snapshot_state
from conveyor.broker.pager import Pager
from conveyor.broker.wal import (
    CorruptLog,
    WalStore,
    recover,
    snap_name,
    verify_snapshot,
    write_snapshot,
)

log = logging.getLogger("conveyor.durability")


class DataDirLocked(Exception):
    """Another broker is using this data directory."""


class Durability:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.wal_dir = self.data_dir / "wal"
        self.store: WalStore | None = None
        self.broker: Broker | None = None
        self._lock: IO[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_snapshot = time.monotonic()
        self._last_snapshot_size = 0
        # The newest verified snapshot's index: kept, with the log after it, when the next
        # snapshot is written (0: none, keep the whole log).
        self._keep_from = 0
        self._snapshotting = False
        self.recovery_seconds = 0.0
        self.recovered_messages = 0
        self.snapshots = 0

    def open(self) -> Broker:
        """Lock the data directory, recover, and return the broker with its WAL store.

        Raises CorruptLog (damage mid-log, no --repair) or DataDirLocked.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_dir / "LOCK", "wb")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataDirLocked(f"{self.data_dir} is in use by another broker") from None
        t0 = time.monotonic()
        # Recovery allocates an object per message and frees nothing: the cyclic GC would
        # rescan the growing heap over and over (3x the replay time at 1M messages).
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            broker = self._recover(t0)
        finally:
            gc.freeze()  # recovered messages hold no cycles; keep them out of later scans
            if gc_enabled:
                gc.enable()
        return broker

    def _recover(self, t0: float) -> Broker:
        cfg = self.config
        pager = Pager(self.data_dir / "pages", cfg.memory_budget)
        replay = Replay(pager=pager)
        rec = recover(
            self.wal_dir,
            repair=self.config.repair,
            on_snapshot=replay.load_snapshot,
            on_batch=replay.apply,
        )
        store = WalStore(
            self.wal_dir,
            rec.next_segment,
            fsync=cfg.fsync,
            interval_ms=cfg.fsync_interval_ms,
            segment_bytes=cfg.segment_bytes,
        )
        broker = Broker(
            store, durable=True, pager=pager, max_message_size=cfg.effective_max_message_size()
        )
        broker.streams.configure(self.data_dir / "streams", cfg.fsync, cfg.fsync_interval_ms)
        broker.streams.repair = cfg.repair
        self.recovered_messages = replay.build(broker)
        broker.streams.cleanup_orphans()  # directories of streams deleted before a crash
        store.bytes_since_snapshot = rec.bytes_replayed
        self._keep_from = rec.snapshot_index
        if replay.lost:
            log.error(
                "--repair: %d messages whose entries were in the damaged part of the "
                "snapshot are lost",
                replay.lost,
            )
        if rec.quarantined:
            # What was replayed from a quarantined segment now exists only in memory (the
            # next start skips the *.corrupt file): snapshot it before anything new is
            # logged, so the repaired state survives the next restart.
            head, messages = snapshot_state(broker)
            path, size = write_snapshot(
                self.wal_dir, store.seg_index, head, snapshot_entries(messages)
            )
            try:
                verify_snapshot(path)
            except ValueError as exc:
                raise CorruptLog(
                    path,
                    0,
                    f"the snapshot of the repaired state did not read back ({exc})",
                    "check the disk, then start with --repair again",
                ) from None
            store.bytes_since_snapshot = 0
            self._last_snapshot_size = size
            self._keep_from = store.seg_index  # the repaired state: the only sound base
            log.warning("after the repair: snapshot %s holds the recovered state", path.name)
        self.recovery_seconds = time.monotonic() - t0
        log.info(
            "recovered %d messages in %d queues from %s (%s snapshot, %d log batches, "
            "%.1f MB) in %.2fs",
            self.recovered_messages,
            len(replay.queues),
            self.wal_dir,
            "with" if rec.had_snapshot else "no",
            rec.batches,
            rec.bytes_replayed / 1e6,
            self.recovery_seconds,
            extra={
                "event": "recovery",
                "messages": self.recovered_messages,
                "queues": len(replay.queues),
                "snapshot": rec.had_snapshot,
                "batches": rec.batches,
                "bytes": rec.bytes_replayed,
                "seconds": round(self.recovery_seconds, 3),
            },
        )
        self.store = store
        self.broker = broker
        return broker

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            store = self.store
            if store is None or store.closed or self._snapshotting:
                continue
            due_bytes = max(self.config.snapshot_bytes, 2 * self._last_snapshot_size)
            age_ms = (time.monotonic() - self._last_snapshot) * 1000
            if store.bytes_since_snapshot >= due_bytes or (
                store.bytes_since_snapshot and age_ms >= self.config.snapshot_interval_ms
            ):
                try:
                    await self.snapshot()
                except OSError as exc:
                    log.error("snapshot failed (%s); will retry", exc)

    async def snapshot(self) -> Path:
        """Snapshot now (atomic file), then delete the segments it covers."""
        assert self.store is not None and self.broker is not None
        self._snapshotting = True
        try:
            t0 = time.monotonic()
            self.broker.flush_journal()
            uncovered = self.store.bytes_since_snapshot
            index = self.store.rotate()  # records from now on go to the new segment
            head, messages = snapshot_state(self.broker)
            loop = asyncio.get_running_loop()
            try:
                path, size = await loop.run_in_executor(
                    None, write_snapshot, self.wal_dir, index, head, snapshot_entries(messages)
                )
            except OSError:
                # Nothing is covered yet: keep the count, so the snapshot stays due and is
                # retried (disk full) instead of waiting for as much log again.
                self.store.bytes_since_snapshot += uncovered
                raise
            del messages
            try:
                await loop.run_in_executor(None, verify_snapshot, path)
            except ValueError as exc:
                # Keep everything the previous snapshot needs; recovery would skip this one.
                dest = path.with_suffix(".corrupt")
                path.rename(dest)
                raise OSError(
                    f"snapshot {path.name} did not read back ({exc}); set aside "
                    f"as {dest.name}, the previous one and its log are kept"
                ) from None
            keep = self._keep_from
            deleted = self.store.delete_segments_before(keep) if keep else 0
            self._keep_from = index
            self._last_snapshot_size = size
            self._last_snapshot = time.monotonic()
            self.snapshots += 1
            log.info(
                "snapshot %s: %.1f MB, verified; %d segments deleted (kept %s and the "
                "log after it), %.2fs",
                path.name,
                self._last_snapshot_size / 1e6,
                deleted,
                snap_name(keep) if keep else "the whole log",
                time.monotonic() - t0,
            )
            return path
        finally:
            self._snapshotting = False

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.broker is not None:
            self.broker.streams.close()  # buffered appends, fsync, group offsets
        if self.store is not None:
            self.store.close()
        if self._lock is not None:
            self._lock.close()


__all__ = ["CorruptLog", "DataDirLocked", "Durability"]
