"""Helpers for the pool's supervision tests: fixture models, configs, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from pool.config import PoolConfig, load_config
from pool.manager import PoolManager

MODELS = Path(__file__).resolve().parent.parent / "models" / "pool"
PROJECT = Path(__file__).resolve().parent.parent.parent

# Fast restarts and bounded graces keep the suite quick on a 2-core machine shared with others.
FAST = {
    "runners.backoff_initial_s": 0.05,
    "runners.backoff_max_s": 0.5,
    "runners.stop_grace_s": 5.0,
    "runners.cancel_grace_s": 5.0,
    "shutdown.grace_s": 10.0,
    # Webhook receivers in these tests listen on loopback: allowed, as an operator would.
    "network.allow_cidrs": ["127.0.0.1/32"],
}


def make_config(tmp_path: Path, model: str = "worker", **overrides: Any) -> PoolConfig:
    """A loaded config for a fixture model; keyword ``runners__count=3`` means runners.count."""
    values: dict[str, Any] = {
        "model.path": str(MODELS / model),
        "state_dir": str(tmp_path / "state"),
        **FAST,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env={}, overrides=values)


async def wait_until(
    cond: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """Poll ``cond`` (sync, or returning an awaitable) until it is truthy, and return that;
    fail after ``timeout_s`` (a deadline, not a sleep). ``cond`` may assert, to fail early."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def wait_until_sync(
    cond: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """``wait_until`` for code outside an event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _exists(path: Path) -> bool:
    return path.exists()


def path_exists(path: str, *, is_dir: bool = False) -> bool:
    """A sync helper so async tests may look at the file system without blocking lint."""
    return Path(path).is_dir() if is_dir else Path(path).exists()


def runner_pids(manager: PoolManager) -> list[int]:
    return [r["pid"] for r in manager.health()["runners"] if r["pid"] is not None]


@contextlib.asynccontextmanager
async def running_pool(
    config: PoolConfig, *, ready: bool = True, grace_s: float = 10.0, metrics: Any = None
) -> AsyncIterator[PoolManager]:
    """A started PoolManager (READY unless ``ready=False``); shut down and checked after."""
    manager = PoolManager(config, metrics=metrics)
    await manager.start()
    seen: set[int] = set()
    try:
        if ready:
            await wait_until(lambda: manager.status == "READY", timeout_s=60, what="pool READY")
        seen.update(runner_pids(manager))
        yield manager
    finally:
        seen.update(runner_pids(manager))
        await manager.shutdown(grace_s)
        left = [pid for pid in seen if pid_alive(pid)]
        assert not left, f"runner processes left after shutdown: {left}"
        assert not _exists(Path(manager.state_dir, "runner-0")), "runner dir left behind"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m", *, nr_inodes: int | None = None) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (as Docker's /dev/shm is one, 64 MiB by default),
    with at most ``nr_inodes`` files if given; unmounted after. The suite runs as root (CI's
    container does too)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"cannot mount a tmpfs at {path} (needs root): {done.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_filesystem(path: Path) -> None:
    """Write ``path`` (a file on a small filesystem) until the filesystem is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    with open(path, "ab", buffering=0) as f:  # the last partial page, byte by byte
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def fill_inodes(directory: Path) -> None:
    """Create empty files in ``directory`` until its filesystem has no inode left."""
    directory.mkdir(exist_ok=True)
    for n in range(1_000_000):
        try:
            (directory / f"f{n}").touch()
        except OSError:
            return
