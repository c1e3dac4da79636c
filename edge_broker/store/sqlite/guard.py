"""The store file guarded against interference: one writer per file, and noticing when the file
is deleted or replaced under a running broker.

Theory of operation
-------------------
*One writer.* The data directory's lock file (`edge-broker.lock`, server/admin.py) keeps a
second broker out only while that file exists; deleted, the next broker makes a new one and
opens the same database. So the store also locks the database file itself: an exclusive
`flock` on `edge-broker.db`, held from before SQLite opens it until after it is closed. flock
locks are separate from the POSIX (fcntl) byte-range locks SQLite uses on Linux and belong to
the open file description, so they neither disturb SQLite's locking (WAL readers such as the
admin helpers still read the file while the broker runs) nor go away when another descriptor
of the same file is closed in the process (the trap of POSIX locks). A second store on the
same file gets `StoreInUseError` naming the file (the broker exits with 2: restarting cannot
help). `store_in_use(path)` tells the admin CLI that some process holds the file although the
lock file says nobody does. (flock on NFS is emulated with fcntl locks; SQLite's own docs
advise against databases on NFS anyway.) Taking the lock is retried for `LOCK_WAIT_S`, since
`store_in_use` holds a shared lock for an instant.

*Deleted or replaced.* SQLite keeps writing through its open descriptors: after `rm
edge-broker.db*` the broker would go on acknowledging into a file no name leads to, lost at
the next restart. The guard records the identity (device, inode) of the database file it
locked and of its -wal file, and `check()` compares them with what the paths name now: two
stat calls, run after every commit and about once a second while idle. Once they differ the
file is `lost`: the store reports `full` (the server refuses new QoS 1/2 PUBLISH: 0x97 on MQTT
5, no acknowledgement on 3.1.1) and logs one error naming the path, saying what happened and
what a restart would do. See SqliteStore for what happens to the commits in flight. Should the
same file come back under the path (moved away and back), the state clears.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Final

from ...errors import StoreInUseError

__all__ = ["LOCK_WAIT_S", "FileGuard", "store_in_use"]

log = logging.getLogger("edge_broker.store")

LOCK_WAIT_S: Final = 2.0  # how long taking the file's lock is retried
_LOCK_POLL_S: Final = 0.05

_Identity = tuple[int, int]


def _identity(path: str | Path) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class FileGuard:
    """The lock on one store file and the watch on its identity (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self._fd: int | None = None
        self._file: _Identity | None = None
        self._wal: _Identity | None = None
        self.lost = False

    def lock(self) -> None:
        """Take the exclusive lock (creating the file if needed). Blocking: call it from a
        worker thread. Raises StoreInUseError while another process holds it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # as SQLite
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreInUseError(
                        f"{self.path}: the store file is in use by another process (another "
                        f"edge-broker on the same data directory, whose lock file may have "
                        f"been removed): one broker per store file; stop the other one "
                        f"first") from None
                time.sleep(_LOCK_POLL_S)  # a reader's shared lock lasts an instant
            except OSError:
                os.close(fd)
                raise
        self._fd = fd

    def watch(self) -> None:
        """Record the identities to compare with (after SQLite opened the file)."""
        if self._fd is not None:
            st = os.fstat(self._fd)
            self._file = (st.st_dev, st.st_ino)
        self._wal = _identity(self.wal_path)

    def check(self) -> bool:
        """Compare the paths with the files opened; log a change. Returns `lost`. Cheap."""
        if self._file is None:
            return False
        lost = _identity(self.path) != self._file
        if not lost:
            wal = _identity(self.wal_path)
            if self._wal is None:
                self._wal = wal  # SQLite creates the -wal with the first transaction
            elif wal != self._wal:
                lost = True
        if lost and not self.lost:
            log.error("%s", self.describe_lost())
        elif self.lost and not lost:
            log.warning("%s: the store file is back under its name: accepting QoS 1/2 "
                        "messages again", self.path)
        self.lost = lost
        return lost

    def describe_lost(self) -> str:
        return (f"{self.path}: the store file (or its -wal) was deleted or replaced while the "
                f"broker runs: commits now go to a file that no name leads to and would be "
                f"lost at the next restart. New QoS 1/2 messages are refused (MQTT 5: 0x97, "
                f"3.1.1: no acknowledgement); batches not acknowledged yet were failed; queued "
                f"messages are still delivered from memory. A restart starts from what the "
                f"path holds then (a new, empty store if nothing): restore the file first if "
                f"it was removed by mistake")

    def close(self) -> None:
        """Release the lock (after SQLite closed the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file = self._wal = None


def store_in_use(path: str | Path) -> bool:
    """Whether a process holds the lock of this store file right now (a running broker)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock too
    return False
