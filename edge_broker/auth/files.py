"""Atomic file replacement, shared by the password file and the certificate tools."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace `path` with `data` atomically; the new file has `mode` from its creation on
    (never readable by others, not even briefly).

    A file it replaces keeps who may read it: its group, the group's permission bits
    (added to `mode`; never bits for others), and, when run as root, its owner. So a
    password file or a server key an administrator made readable by the broker's group
    (`chgrp edge-broker; chmod 0640`) stays readable after the next `passwd` or `certs`
    run, as mosquitto_passwd, which rewrites the file in place, leaves it."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        old = os.stat(path)
    except OSError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        if old is not None:
            with contextlib.suppress(PermissionError):  # a group we are not in
                os.fchown(fd, old.st_uid if os.geteuid() == 0 else -1, old.st_gid)
            if os.fstat(fd).st_gid == old.st_gid:  # never to another group than it had
                mode |= stat.S_IMODE(old.st_mode) & 0o070
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
