"""The pool's directories: one pool per state dir (a lock), dead pools' leftovers swept, 0700."""

from __future__ import annotations

import asyncio
import glob
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pool_helpers import MODELS, PROJECT, make_config, pid_alive, running_pool, wait_until

from pool.errors import PoolError
from pool.manager import PoolManager
from pool.prediction import PredictionRequest


async def test_a_second_pool_on_the_same_state_dir_fails_at_start_naming_dir_and_holder(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as first:
        first_pid = first.runners[0]["pid"]
        # Steps: a second pool is given the same state dir while the first one serves.
        second = PoolManager(config)
        with pytest.raises(PoolError) as caught:
            await second.start()
        await second.shutdown(5)
        # Result: a clear error naming the dir and the holder; the first pool's runner was
        # neither stopped nor replaced, and it still serves.
        assert first.state_dir in str(caught.value)
        assert f"pid {os.getpid()}" in str(caught.value)
        assert first.runners[0]["pid"] == first_pid and pid_alive(first_pid)
        p = await first.submit(PredictionRequest(id=None, input={}))
        await p.wait(30)
        assert p.status == "succeeded", p.error


def sweep_bases() -> list[str]:
    """Where a pool makes its default dirs: /dev/shm and the system's temp dir."""
    return ["/dev/shm", tempfile.gettempdir()]


def _dead_pool_dirs(pid: int) -> list[str]:
    found: list[str] = []
    for base in sweep_bases():
        for prefix in ("cog-pool-", "cog-pool-inputs-", "cog-pool-files-"):
            found += glob.glob(os.path.join(base, f"{prefix}{pid}-*"))
    return sorted(found)


def _serve(log_path: Path) -> subprocess.Popen[bytes]:
    """A ``cog-pool serve`` of the proc model with its default dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")}
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cogpool", "serve", str(MODELS / "proc"), "--port", "0"],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _set_up(pid: int) -> bool:
    pattern = f"cog-pool-{pid}-*/runner-0/setup_result.json"
    return any(glob.glob(os.path.join(base, pattern)) for base in sweep_bases())


async def test_dirs_of_a_pool_killed_with_kill_9_are_swept_by_the_next_pool(
    tmp_path: Path,
) -> None:
    # Steps: a `cog-pool serve` with its default dirs; its runner is set up; kill -9 it.
    proc = _serve(tmp_path / "serve.log")
    try:
        await wait_until(lambda: _set_up(proc.pid), timeout_s=60, what="the pool's runner set up")
    finally:
        proc.kill()
        proc.wait(30)
    # Left behind: its state dir (runner dirs, seen above), inputs dir and files dir. (No
    # assertion here: on a machine shared with other pools, any pool starting now may sweep
    # them first, which is the behaviour under test too.)
    # Result: the next pool to start removes them (the pid is dead, nobody holds the lock).
    async with running_pool(make_config(tmp_path, "proc")):
        pass
    assert _dead_pool_dirs(proc.pid) == []


async def test_a_configured_state_dirs_runner_dirs_are_private(tmp_path: Path) -> None:
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        runner = manager._supervisor.runners[0]
        # The protocol dir (requests, inputs' paths), then the runner's temporary root.
        assert oct(stat.S_IMODE(os.stat(runner.working_dir).st_mode)) == oct(0o700)
        assert oct(stat.S_IMODE(os.stat(runner.temp_dir).st_mode)) == oct(0o700)


async def test_serve_on_a_state_dir_in_use_exits_3_naming_dir_and_holder(tmp_path: Path) -> None:
    config = make_config(tmp_path, "proc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")}
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    async with running_pool(config):
        # Steps: `cog-pool serve --state-dir <the same dir>` while the first pool serves.
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cogpool", "serve", str(MODELS / "proc"), "--port", "0"),
            *("--state-dir", str(config.state_dir)),
            cwd=PROJECT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    # Result: it exits at once with code 3 and says which dir and which pool holds it.
    assert proc.returncode == 3, err
    assert (
        f"state dir {config.state_dir} is in use by another pool (pid {os.getpid()}"
        in err.decode()
    )
