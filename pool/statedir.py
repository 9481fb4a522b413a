"""The pool's directories on the machine: its state dir, the lock on it, and dead pools' leftovers.

- The **state dir** holds the runners' protocol dirs (``runner-<i>/``, 0700); by default a fresh
  ``/dev/shm/cog-pool-<pid>-*`` (a tmpfs: protocol files are small and written often).
- The **files dir** (``<tmp>/cog-pool-files-<pid>-*``, on disk) holds each runner's private
  temporary root (``runner-<i>-tmp/``), where large deltas and returned file objects spill.
- One pool at a time per state dir: an exclusive ``flock`` on ``<state_dir>/.pool.lock``,
  which names its holder. A second pool given the same dir fails at start with `StateDirBusy`
  instead of sharing ``runner-0`` and stopping the first pool's runners.
- A starting pool removes what a pool killed with ``kill -9`` left behind: ``cog-pool-<pid>-*``
  dirs (state, inputs, files) whose pid is no longer alive and whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable

from pool.errors import PoolError

__all__ = [
    "LOCK_FILE",
    "StateDirBusy",
    "StateDirLock",
    "default_state_dir",
    "files_dir_path",
    "locked_by_someone",
    "sweep_bases",
    "sweep_dead_pools",
]

log = logging.getLogger("pool.statedir")

LOCK_FILE = ".pool.lock"  # never a prediction id (ids start with a letter or digit)
# cog-pool-<pid>-*, cog-pool-inputs-<pid>-*, cog-pool-files-<pid>-*: every dir a pool makes
# for itself under a shared base; the pid says whose it is.
_POOL_DIR_RE = re.compile(r"^cog-pool-(?:inputs-|files-)?(?P<pid>[0-9]+)-")
_SHM = "/dev/shm"


class StateDirBusy(PoolError):
    """Another live pool holds the state dir's lock; the message names the dir and holder."""


def _shm_base() -> str | None:
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


def default_state_dir() -> str:
    """A fresh ``cog-pool-<pid>-*`` dir: on /dev/shm when writable (protocol files are small
    and written often), else in the system's temporary directory."""
    return tempfile.mkdtemp(prefix=f"cog-pool-{os.getpid()}-", dir=_shm_base())


def files_dir_path() -> str:
    """The (not yet created) on-disk dir for the runners' temporary roots."""
    name = f"cog-pool-files-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(tempfile.gettempdir(), name)


def sweep_bases() -> list[str]:
    """Where pools make their default dirs: /dev/shm (when writable) and the temp dir."""
    bases = [tempfile.gettempdir()]
    shm = _shm_base()
    if shm is not None and shm not in bases:
        bases.insert(0, shm)
    return bases


class StateDirLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/.pool.lock`` for this process."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StateDirBusy` naming the dir and the holder."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StateDirBusy(
                f"state dir {self.state_dir} is in use by another pool ({holder}, lock "
                f"{self.path}); give each pool its own state_dir (--state-dir)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last fd of the open file drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def locked_by_someone(path: str) -> bool:
    """True when ``<path>/.pool.lock`` exists and another open file holds its flock."""
    lock = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


def sweep_dead_pools(bases: Iterable[str] | None = None) -> list[str]:
    """Remove ``cog-pool-<pid>-*`` dirs of pools that are gone (pid dead, lock free).

    Runs once at start, in a worker thread (a dead pool may have left large files).
    Returns the removed paths.
    """
    removed: list[str] = []
    me = os.getpid()
    for base in sweep_bases() if bases is None else bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            m = _POOL_DIR_RE.match(name)
            if m is None:
                continue
            pid = int(m["pid"])
            path = os.path.join(base, name)
            if pid == me or _pid_alive(pid) or not os.path.isdir(path) or os.path.islink(path):
                continue
            if locked_by_someone(path):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
            if not os.path.exists(path):
                removed.append(path)
                log.info("dead_pool_dir_removed path=%s pid=%d", path, pid)
    return removed
