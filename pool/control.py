"""``cog-pool reload`` and ``cog-pool scale``: an operator's requests to a running pool.

The pool is found through its state dir: ``.pool.lock`` in it names the live pool's pid
(``--state-dir DIR``), and a pool started without ``state_dir`` keeps its state in a
``cog-pool-<pid>-*`` dir under /dev/shm or the temporary directory (``--pid PID`` finds it).

- ``reload``: writes the reload request file into the state dir, then SIGHUP. SIGHUP alone
  is the runners' "rescan" hint in the file+signal protocol and says nothing more, so the file
  is what asks for the reload (files are the state; signals only say "look").
- ``scale +1`` / ``scale -1``: SIGTTIN / SIGTTOU (gunicorn's convention). Standard signals
  coalesce, so each call asks for one runner; call again for the next.

Both return once the request is delivered; the pool replaces or adds runners in the
background (``/health-check``: ``reload`` and ``runners``). ``reload --wait URL`` instead
follows the pool's ``/health-check`` (open without the token) until this reload has ended.
Exit codes: 0 delivered (with ``--wait``: the reload succeeded), 2 bad arguments, 5 no live
pool found, 6 the reload failed (its error is printed), 7 ``--wait`` could not tell within
``--wait-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from coglet import protocol
from pool.statedir import LOCK_FILE, locked_by_someone, sweep_bases
from pool.supervisor import (
    RELOAD_REQUEST_FILE,
    RELOAD_SIGNAL,
    SCALE_DOWN_SIGNAL,
    SCALE_UP_SIGNAL,
)

__all__ = ["PoolNotFound", "control_main", "find_pool", "request_reload", "request_scale"]

EXIT_USAGE = 2
EXIT_NO_POOL = 5
EXIT_RELOAD_FAILED = 6
EXIT_WAIT_TIMED_OUT = 7
WAIT_POLL_S = 0.2
HTTP_TIMEOUT_S = 5.0

_SCALE = {
    "+1": SCALE_UP_SIGNAL,
    "up": SCALE_UP_SIGNAL,
    "-1": SCALE_DOWN_SIGNAL,
    "down": SCALE_DOWN_SIGNAL,
}
_HOLDER_RE = re.compile(r"^pid ([0-9]+)\s*$")


class PoolNotFound(Exception):
    """No live pool at the given state dir or pid; the message says what was looked at."""


def _holder_pid(state_dir: str) -> int | None:
    try:
        with open(os.path.join(state_dir, LOCK_FILE), encoding="ascii", errors="replace") as f:
            m = _HOLDER_RE.match(f.read(64))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def find_pool(*, pid: int | None = None, state_dir: str | None = None) -> tuple[int, str]:
    """The live pool's ``(pid, state dir)`` from either; raises PoolNotFound."""
    if state_dir is not None:
        holder = _holder_pid(state_dir)
        if holder is None or not locked_by_someone(state_dir):
            raise PoolNotFound(f"no live pool holds state dir {state_dir} (no held {LOCK_FILE})")
        if pid is not None and pid != holder:
            raise PoolNotFound(f"state dir {state_dir} belongs to pid {holder}, not {pid}")
        return holder, state_dir
    if pid is None:
        raise PoolNotFound("give --pid PID or --state-dir DIR")
    looked = []
    for base in sweep_bases():
        looked.append(base)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            if not name.startswith(f"cog-pool-{pid}-"):
                continue
            path = os.path.join(base, name)
            if _holder_pid(path) == pid and locked_by_someone(path):
                return pid, path
    raise PoolNotFound(
        f"no state dir of pool pid {pid} under {', '.join(looked)}; a pool with a configured "
        "state_dir is found with --state-dir DIR"
    )


def request_reload(pid: int, state_dir: str) -> None:
    """Ask pool ``pid`` to replace its runners: the request file, then SIGHUP."""
    protocol.write_atomic(os.path.join(state_dir, RELOAD_REQUEST_FILE), b"")
    os.kill(pid, RELOAD_SIGNAL)


def request_scale(pid: int, change: str) -> None:
    """Ask pool ``pid`` for one runner more (``+1``) or less (``-1``)."""
    os.kill(pid, _SCALE[change])


def reload_health(url: str) -> dict[str, object]:
    """The ``reload`` object of the pool's ``/health-check`` at ``url``."""
    with urllib.request.urlopen(url.rstrip("/") + "/health-check", timeout=HTTP_TIMEOUT_S) as r:
        body = json.loads(r.read())
    reload = body.get("reload") if isinstance(body, dict) else None
    if not isinstance(reload, dict):
        raise ValueError(f"{url}/health-check has no reload object (an older pool?)")
    return reload


def wait_for_reload(url: str, count_before: int, wait_s: float) -> tuple[str, str | None]:
    """Follow ``/health-check`` until reload number ``count_before + 1`` (or later) has
    ended; returns its state and error. TimeoutError past ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reload = reload_health(url)
        except (OSError, ValueError, urllib.error.URLError):
            reload = {}
        count = reload.get("count")
        state = reload.get("state")
        if isinstance(count, int) and count > count_before and state in ("succeeded", "failed"):
            error = reload.get("error")
            return str(state), str(error) if error is not None else None
        if time.monotonic() > deadline:
            raise TimeoutError(f"the reload had not ended after {wait_s}s (last: {reload})")
        time.sleep(WAIT_POLL_S)  # the poll interval of a bounded wait


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"cog-pool {command}")
    if command == "scale":
        p.add_argument(
            "change", choices=sorted(_SCALE), help="+1/up: add a runner; -1/down: drain one away"
        )
    if command == "reload":
        p.add_argument("--wait", metavar="URL", help="follow URL/health-check until it ends")
        p.add_argument("--wait-s", type=float, default=600.0, help="at most this long (600)")
    p.add_argument("--pid", type=int, help="the pool's process id")
    p.add_argument("--state-dir", help="the pool's state dir (state_dir)")
    return p


def control_main(command: str, argv: Sequence[str]) -> int:
    """``cog-pool reload|scale ...``; returns the exit code."""
    try:
        args = _parser(command).parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.pid is None and args.state_dir is None:
        print(f"cog-pool {command}: give --pid PID or --state-dir DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        pid, state_dir = find_pool(pid=args.pid, state_dir=args.state_dir)
        if command == "reload":
            before = -1
            if args.wait:
                before = int(str(reload_health(args.wait).get("count", 0)))
            request_reload(pid, state_dir)
            print(f"reload requested: pool pid {pid}; progress in /health-check 'reload'")
            if args.wait:
                return _report_wait(args.wait, before, args.wait_s)
        else:
            request_scale(pid, args.change)
            print(f"scale {args.change} requested: pool pid {pid}; see /health-check 'runners'")
    except (PoolNotFound, ProcessLookupError, OSError, ValueError) as e:
        print(f"cog-pool {command}: {e}", file=sys.stderr)
        return EXIT_NO_POOL
    return 0


def _report_wait(url: str, before: int, wait_s: float) -> int:
    try:
        state, error = wait_for_reload(url, before, wait_s)
    except TimeoutError as e:
        print(f"cog-pool reload: {e}", file=sys.stderr)
        return EXIT_WAIT_TIMED_OUT
    if state == "succeeded":
        print("reload succeeded")
        return 0
    print(f"cog-pool reload: {error}", file=sys.stderr)
    return EXIT_RELOAD_FAILED
