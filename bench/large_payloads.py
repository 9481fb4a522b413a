"""Large payloads and a long soak: cog-pool beside Cog 0.23 (not run in CI).

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/large_payloads.py                      # both scenarios, both runtimes
    .venv/bin/python bench/large_payloads.py --only cog-pool --soak 2000
    .venv/bin/python bench/large_payloads.py --cog-venv /work/cog-venv --size-mb 100

Scenarios:
1. **Large payloads**: ``bench/models/file_out`` returns a ``size_mb`` MiB file (the response
   carries it as a data: URI), ``bench/models/str_out`` a ``size_mb`` MiB string, and
   ``bench/models/data_in`` takes a ``data_in_mb`` MiB file as a data: URI input (Cog refuses
   bodies over 100 MiB, so 72 MiB: 96 MiB of base64).
   For each: end-to-end time of a sync ``POST /predictions`` (median of ``--repeats``), the
   peak RSS of the HTTP process and of its workers (sampled every 10 ms while the requests
   run), and ``/health-check`` latency (p50/p99/max) polled every 10 ms meanwhile. The
   client reads a large response a chunk at a time (``--client-read whole``: ``resp.read()``,
   whose one join on the client's loop used to show up as /health-check latency), and sends
   the request body, encoded once before the timed requests, a 1 MiB slice at a time with its
   Content-Length (``--client-send whole``: ``post(json=body)``, whose ``json.dumps`` and one
   96 MiB write on the client's loop showed up the same way).
2. **Soak**: ``--soak`` null predictions (default 20,000) from 4 keep-alive clients against
   one runner; RSS and open fds of the HTTP process and of the runner after a warm-up and at
   the end.

Prints markdown tables (stdout) to paste into bench/RESULTS.md, and one ``event key=value``
line per step on stderr. Every wait is bounded; servers listen on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    BENCH_DIR,
    Server,
    ServerSpec,
    _descendants,
    cog_server_spec,
    free_port,
    log,
    percentile,
    pool_server_spec,
)

FILE_OUT = BENCH_DIR / "models" / "file_out"
STR_OUT = BENCH_DIR / "models" / "str_out"
DATA_IN = BENCH_DIR / "models" / "data_in"
MODELS = {"file_out": FILE_OUT, "str_out": STR_OUT, "data_in": DATA_IN}
NULL = BENCH_DIR / "models" / "null"
SAMPLE_S = 0.01
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=600)


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Peaks:
    front_kib: int = 0
    workers_kib: int = 0  # the largest single worker process


@dataclass
class PayloadResult:
    runtime: str
    scenario: str
    e2e_s: list[float] = field(default_factory=list)
    peaks: Peaks = field(default_factory=Peaks)
    health_s: list[float] = field(default_factory=list)
    failed: int = 0


async def _sample_rss(pid: int, peaks: Peaks, stop: asyncio.Event) -> None:
    while not stop.is_set():
        peaks.front_kib = max(peaks.front_kib, _status_kib(pid, "VmRSS"))
        for child in _descendants(pid):
            peaks.workers_kib = max(peaks.workers_kib, _status_kib(child, "VmRSS"))
        await asyncio.sleep(SAMPLE_S)


async def _poll_health(base_url: str, samples: list[float], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with session.get(f"{base_url}/health-check") as resp:
                    await resp.read()
                samples.append(time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError):
                samples.append(time.perf_counter() - started)
            await asyncio.sleep(SAMPLE_S)


def _spec(runtime: str, model_dir: Path, cog_venv: Path) -> ServerSpec:
    port = free_port()
    if runtime == "cog":
        return cog_server_spec(port=port, model_dir=model_dir, venv=cog_venv)
    spec = pool_server_spec(port=port, model_dir=model_dir, extra_args=("--log-level", "warning"))
    env = dict(spec.env)
    env["COG_POOL_HTTP_MAX_BODY_BYTES"] = str(1 << 30)  # a 100 MiB file is 133 MiB as base64
    return ServerSpec(spec.name, spec.argv, env, spec.cwd, spec.port, spec.runners)


CLIENT_READS = ("streamed", "whole")
CLIENT_SENDS = ("streamed", "whole")
_SEND_SLICE = 1 << 20


def _post_kwargs(body: dict[str, Any], encoded: bytes, how: str) -> dict[str, Any]:
    """``session.post`` arguments for ``body``: ``json=body`` (``whole``), or its bytes
    (``encoded``) sent a slice at a time with their Content-Length (``streamed``), so the
    client's loop, which also polls /health-check, is never held by the send."""
    if how == "whole":
        return {"json": body}

    async def slices() -> AsyncIterator[bytes]:
        view = memoryview(encoded)
        for start in range(0, len(view), _SEND_SLICE):
            yield bytes(view[start : start + _SEND_SLICE])
            await asyncio.sleep(0)

    headers = {"Content-Type": "application/json", "Content-Length": str(len(encoded))}
    return {"data": slices(), "headers": headers}


async def _read_body(resp: aiohttp.ClientResponse, how: str) -> tuple[int, bytes]:
    """The body's size, and its first and last 4 KiB.

    ``streamed`` reads it a chunk at a time and keeps only those ends: the client's own loop
    (which also polls /health-check) never stalls. ``whole`` is ``resp.read()``, as every run before
    the bigout2 branch: the client joins the whole body in one call on that same loop (~0.1 s for
    133 MiB on this machine), and that stall landed in the /health-check figures."""
    if how == "whole":
        raw = await resp.read()
        return len(raw), raw[:4096] + raw[-4096:]
    size = 0
    head = b""
    tail = b""
    async for chunk in resp.content.iter_chunked(1 << 20):
        size += len(chunk)
        if len(head) < 4096:
            head += chunk[: 4096 - len(head)]
        tail = (tail + chunk)[-4096:]
    return size, head + tail


async def run_payload(
    runtime: str,
    scenario: str,
    body: dict[str, Any],
    repeats: int,
    cog_venv: Path,
    client_read: str = "streamed",
    client_send: str = "streamed",
) -> PayloadResult:
    model = MODELS[scenario]
    result = PayloadResult(runtime, scenario)
    encoded = json.dumps(body).encode() if client_send == "streamed" else b""
    async with Server(_spec(runtime, model, cog_venv)) as server:
        await server.wait_ready(120)
        assert server._proc is not None
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(_sample_rss(server._proc.pid, result.peaks, stop)),
            asyncio.create_task(_poll_health(server.spec.base_url, result.health_s, stop)),
        ]
        try:
            async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
                for i in range(repeats):
                    started = time.perf_counter()
                    async with session.post(
                        f"{server.spec.base_url}/predictions",
                        **_post_kwargs(body, encoded, client_send),
                    ) as resp:
                        size, ends = await _read_body(resp, client_read)
                    elapsed = time.perf_counter() - started
                    ok = resp.status == 200 and b'"succeeded"' in ends
                    result.failed += 0 if ok else 1
                    result.e2e_s.append(elapsed)
                    log("payload_request", runtime=runtime, scenario=scenario, n=i,
                        status=resp.status, ok=ok, bytes=size, s=f"{elapsed:.3f}")  # fmt: skip
        finally:
            stop.set()
            await asyncio.gather(*watchers)
    return result


@dataclass
class SoakResult:
    runtime: str
    predictions: int
    failed: int
    elapsed_s: float
    start: dict[str, int]
    mid: dict[str, int]  # after the first half: the recent-prediction store is full by then
    end: dict[str, int]


def _footprint(pid: int) -> dict[str, int]:
    workers = _descendants(pid)
    return {
        "front_rss_kib": _status_kib(pid, "VmRSS"),
        "front_fds": _fds(pid),
        "workers_rss_kib": sum(_status_kib(w, "VmRSS") for w in workers),
        "workers_fds": sum(_fds(w) for w in workers),
    }


async def run_soak(runtime: str, total: int, cog_venv: Path, clients: int = 4) -> SoakResult:
    async with Server(_spec(runtime, NULL, cog_venv)) as server:
        await server.wait_ready(120)
        assert server._proc is not None
        url = f"{server.spec.base_url}/predictions"
        failed = 0
        done = 0

        async def client(session: aiohttp.ClientSession, n: int) -> None:
            nonlocal failed, done
            for _ in range(n):
                while True:
                    async with session.post(url, json={"input": {}}) as resp:
                        await resp.read()
                    if resp.status != 409:  # Cog answers 409 while its one slot is taken
                        break
                failed += resp.status != 200
                done += 1

        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            await asyncio.gather(*(client(session, 50) for _ in range(clients)))  # warm-up
            start = _footprint(server._proc.pid)
            started = time.perf_counter()
            half = total // clients // 2
            await asyncio.gather(*(client(session, half) for _ in range(clients)))
            mid = _footprint(server._proc.pid)
            rest = total // clients - half
            await asyncio.gather(*(client(session, rest) for _ in range(clients)))
            elapsed = time.perf_counter() - started
            end = _footprint(server._proc.pid)
    log("soak_done", runtime=runtime, predictions=done, failed=failed, s=f"{elapsed:.1f}")
    return SoakResult(runtime, total, failed, elapsed, start, mid, end)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def _ms(values: Sequence[float], q: float) -> str:
    return f"{percentile(sorted(values), q) * 1000:.1f}" if values else "-"


def render_payloads(results: list[PayloadResult], sizes_mb: dict[str, int]) -> str:
    lines = [
        "| scenario | runtime | e2e s (median) | / Cog | HTTP process peak RSS MiB | "
        "worker peak RSS MiB | /health-check p50 / p99 / max ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cog = {r.scenario: statistics.median(r.e2e_s) for r in results if r.runtime == "cog"}
    for r in results:
        med = statistics.median(r.e2e_s)
        ratio = f"{med / cog[r.scenario]:.2f}" if r.scenario in cog else "-"
        health = f"{_ms(r.health_s, 0.5)} / {_ms(r.health_s, 0.99)} / {_ms(r.health_s, 1.0)}"
        what = {
            "file_out": "MiB file out",
            "str_out": "MiB string out",
            "data_in": "MiB data: in",
        }[r.scenario]
        what = f"{sizes_mb[r.scenario]} {what}"
        lines.append(
            f"| {what} | {r.runtime} | {med:.2f} | {ratio} | {_mib(r.peaks.front_kib)} | "
            f"{_mib(r.peaks.workers_kib)} | {health} | {r.failed} |"
        )
    return "\n".join(lines)


def render_soak(results: list[SoakResult]) -> str:
    lines = [
        "| runtime | predictions | failed | elapsed s | HTTP process RSS MiB start → half → end | "
        "fds start → half → end | worker RSS MiB start → half → end | "
        "worker fds start → half → end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        points = (r.start, r.mid, r.end)
        rss = " → ".join(_mib(p["front_rss_kib"]) for p in points)
        fds = " → ".join(str(p["front_fds"]) for p in points)
        worker_rss = " → ".join(_mib(p["workers_rss_kib"]) for p in points)
        worker_fds = " → ".join(str(p["workers_fds"]) for p in points)
        lines.append(
            f"| {r.runtime} | {r.predictions} | {r.failed} | {r.elapsed_s:.1f} | "
            f"{rss} | {fds} | {worker_rss} | {worker_fds} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    runtimes = [args.only] if args.only else ["cog", "cog-pool"]
    cog_venv = Path(args.cog_venv)
    if not args.skip_payloads:
        payload = os.urandom(args.data_in_mb << 20)
        uri = "data:application/octet-stream;base64," + base64.b64encode(payload).decode()
        del payload
        bodies = {
            "file_out": {"input": {"size_mb": args.size_mb}},
            "str_out": {"input": {"size_mb": args.size_mb}},
            "data_in": {"input": {"data": uri}},
        }
        sizes = {"file_out": args.size_mb, "str_out": args.size_mb, "data_in": args.data_in_mb}
        results = []
        for scenario in args.scenarios.split(","):
            body = bodies[scenario]
            for runtime in runtimes:
                results.append(
                    await run_payload(
                        runtime,
                        scenario,
                        body,
                        args.repeats,
                        cog_venv,
                        args.client_read,
                        args.client_send,
                    )
                )
        print(render_payloads(results, sizes))
        print()
    if args.soak:
        soaks = [await run_soak(runtime, args.soak, cog_venv) for runtime in runtimes]
        print(render_soak(soaks))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cog", "cog-pool"])
    parser.add_argument("--size-mb", type=int, default=100, help="file_out and str_out")
    # Cog refuses bodies over 100 MiB (413): 72 MiB is 96 MiB as base64.
    parser.add_argument("--data-in-mb", type=int, default=72)
    parser.add_argument("--scenarios", default="file_out,str_out,data_in")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--soak", type=int, default=20_000, help="0: no soak")
    parser.add_argument("--skip-payloads", action="store_true")
    parser.add_argument(
        "--client-read",
        choices=CLIENT_READS,
        default="streamed",
        help="how the client reads a large response (whole: resp.read(), the old way)",
    )
    parser.add_argument(
        "--client-send",
        choices=CLIENT_SENDS,
        default="streamed",
        help="how the client sends a large body (whole: post(json=body), the old way)",
    )
    parser.add_argument("--cog-venv", default=os.environ.get("BENCH_COG_VENV", "/work/cog-venv"))
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
