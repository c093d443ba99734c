"""One capture process per part of a dataset: a lock file in the output directory.

The lock is an ``flock`` on ``.kdpipe-part-PPPPP-of-NNNNN.lock`` in ``--out``, which holds the
holder's pid, host and start time for the message a second process gets. The kernel drops
the lock when its holder dies however it dies (SIGKILL, crash, node reboot), so a stale file
never blocks a rerun and needs no pid checks; the file is removed on a clean exit.
``flock`` on a network filesystem is shared between hosts where the filesystem supports it
(NFSv4, Lustre with ``-o flock``); where it is refused, capture says so and runs unlocked.

Object-store outputs (``s3://``...) are not locked: a store offers no atomic
create-if-absent that a dead holder releases, so the user must not start the same part twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from kdpipe.schemas import ConfigError


class PartLock:
    """Held while one process captures part ``index`` of ``count`` into the local ``out``."""

    def __init__(self, out: str, index: int, count: int, say: Callable[[str], None]) -> None:
        self.path = Path(out) / f".kdpipe-part-{index:05d}-of-{count:05d}.lock"
        self.say = say
        self.fd: int | None = None

    def __enter__(self) -> "PartLock":
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"--out {self.path.parent}: cannot write there "
                                  f"({e.strerror or e})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(
                        f"--out {self.path.parent}: part already being captured by "
                        f"{holder}; wait for it to finish or stop it, then rerun "
                        f"(lock: {self.path.name})") from e
                self.say(f"cannot lock {self.path} ({e.strerror or e}); nothing keeps a "
                         f"second capture of this part from running at the same time")
                return self
            # the holder we waited on may have removed the file: lock the file that is there
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on {info['host']} (since {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()    # while still locked: no other process holds this inode
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
