"""The space guard: full storage, the ballast file, and the file deleted under the store.

*Full storage.* `full` (store.py; the server refuses new QoS>0 work while it is set) is True
when
1. the data in the file (pages in use, `used_bytes`) is at or over `max_store_bytes`. The
   measure is logical because SQLite reuses free pages: the file would stay big after the
   queues drained (maintenance.py gives free pages back);
2. the disk has less than `disk_reserve_bytes` (`DISK_RESERVE_BYTES`, 8 MiB) free, until twice
   that is free again (`_check_disk`): full is reported while there is still room to commit
   the acks that drain the queues, and meanwhile the WAL is checkpointed and truncated after
   each commit and free pages are vacuumed eagerly (in WAL mode committed data waits in the
   WAL and needs room again in the file to be checkpointed);
3. the disk reported SQLITE_FULL anyway (filled faster than the checks after each commit).
   The transaction is rolled back, nothing is lost or half-applied; the writer (writer.py)
   makes room, cheapest first, retrying at once after each step: checkpoint and truncate the
   WAL, then delete the ballast file (`<db>.ballast`, `BALLAST_BYTES` = 2 MiB of reserved
   blocks; the WAL is checkpointed at ~2 MiB so the ballast covers what waits there). Then it
   retries every <= 1 s, each time with the batches that arrived meanwhile (mostly acks; their
   deletions go first, and the bodies they free are reused by the inserts of the same
   transaction). This clears once a commit succeeded and the ballast could be recreated
   (`_recover_space`: twice its size free). A group that cannot fit even then waits, retried,
   until space is freed on the disk; it is never dropped. `open()` on a disk too full to open
   the file at all (WAL mode needs room for the -shm file even to read) deletes the ballast
   and tries once more; the store then starts `full`;
4. the file was deleted or replaced under the running store (see *Interference*).
`full` is updated after each commit, before that commit's futures resolve, and every second
while idle and full.

*Interference* (guard.py): the store holds an exclusive flock on the file itself, so a second
broker cannot open it even after the data directory's lock file was removed
(`StoreInUseError`). After every commit (before its futures resolve) and every second while
idle, `_check_file` checks that the path still names the file (and -wal) it opened. Once it
does not, `full` is set, one error is logged, and the futures of that commit and of every
batch queued are failed (no acknowledgement after detection: the server closes those
connections, and their publishers send again and are refused). Later batches, which can no
longer accept a QoS 1/2 message, are committed into the unlinked file and resolved as usual,
so acknowledgements from subscribers and deliveries of what the broker holds in memory go on
until the operator restores the file and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Final

from ...errors import StoreError
from .plan import _Pending
from .state import StoreState
from .writer import _fail

log = logging.getLogger("edge_broker.store")

BALLAST_BYTES: Final = 2 * 1024 * 1024
DISK_RESERVE_BYTES: Final = 8 * 1024 * 1024  # `full` when less is free on the disk


class Space(StoreState):
    """SqliteStore's space guard."""

    def _check_file(self, group: list[_Pending] | None = None) -> None:
        """Is the file still under its name (guard.py)? When it stops being, fail
        `group` (just committed) and every batch queued: they may accept QoS 1/2 messages,
        and no acknowledgement may follow once the file is known to be gone. Batches handed
        in later are committed and resolved as usual: the server refuses new QoS 1/2
        messages meanwhile (`full`), and the acks and deliveries of what is queued in memory
        go on."""
        was_lost = self._guard.lost
        if not self._guard.check() or was_lost:
            return
        failure = StoreError(f"{self.path}: the store file was deleted or replaced; "
                             f"not acknowledged")
        if group is not None:
            _fail(group, failure)
        for _, future in self._queue:
            if future is not None and not future.done():
                future.set_exception(failure)

    def _check_disk(self) -> None:
        """Report the disk full early, while there is still room to commit the acks that
        drain the queues: under `disk_reserve_bytes` free, until twice that is free."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        if free < self.disk_reserve_bytes and not self._disk_tight:
            self._disk_tight = True
            log.warning("%s: only %d bytes free on the disk (reserve %d): new work refused",
                        self.path, free, self.disk_reserve_bytes)
        elif free >= 2 * self.disk_reserve_bytes and self._disk_tight:
            self._disk_tight = False
            log.info("%s: %d bytes free on the disk again", self.path, free)

    async def _recover_space(self) -> None:
        """While space is short: keep the WAL truncated (in WAL mode committed data waits
        there, and copying it into the file needs room); after SQLITE_FULL, `full` clears
        once the ballast could be recreated."""
        await self._call(self._checkpoint_sync)
        if not self._disk_full:
            return
        if self.ballast_bytes and not self.ballast_path.exists():
            made = await asyncio.to_thread(_make_ballast, self.ballast_path, self.ballast_bytes)
            if not made:
                return
            log.info("%s: disk space is back; ballast recreated", self.path)
        self._disk_full = False
        self._check_disk()

    def _drop_ballast(self) -> bool:
        try:
            self.ballast_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            log.warning("%s: cannot delete the ballast file: %s", self.path, error)
            return False
        log.warning("%s: deleted the ballast file to make room", self.path)
        return True


def _make_ballast(path: Path, size: int) -> bool:
    """Reserve `size` bytes of real disk blocks in `path`. False (and no file) if no room."""
    try:
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < 2 * size:
            return False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - platforms without fallocate
            chunk = b"\0" * 65536
            for _ in range(0, size, len(chunk)):
                os.write(fd, chunk)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    os.close(fd)
    return True


def _free_disk_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
