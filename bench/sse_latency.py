"""SSE latency: from the model's ``yield`` to the chunk's arrival at the client.

    .venv/bin/python bench/sse_latency.py [--chunks 1000] [--pause-ms 1] [--cog-venv /work/cog-venv]

Serves bench/models/sse_clock (a ``@cog.streaming`` model that yields ``time.time()`` per
chunk) with cog-pool (``python -m cogpool serve``, one runner), then with Cog 0.23.1
(``python -m cog.server.http`` from the Cog venv, given cog-pool's schema where ``cog build``
would write it: bench/cog_compat.py's helpers). An aiohttp client POSTs with
``Accept: text/event-stream`` and, per ``event: output``, records arrival wall clock minus the
yielded one. Client and server share the machine, hence the wall clock. One warm-up stream
of 20 chunks per server is discarded. Prints p50/p99/max in ms and a Markdown row per server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cog_compat  # bench/ is a folder of scripts, not a package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "bench", "models", "sse_clock")
STREAM_TIMEOUT_S = 300.0
WARMUP_CHUNKS = 20


async def measure(base: str, chunks: int, pause_ms: float) -> list[float]:
    """Milliseconds from yield to arrival, one per ``event: output`` of one SSE prediction."""
    latencies_ms: list[float] = []
    body = {"input": {"n": chunks, "pause_ms": pause_ms}}
    headers = {"Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{base}/predictions", json=body, headers=headers) as resp:
            if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                raise RuntimeError(
                    f"{base}: {resp.status} {resp.content_type}: {await resp.text()}"
                )
            event = ""
            async for raw in resp.content:
                arrived = time.time()
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:") and event == "output":
                    chunk = json.loads(line[len("data:") :])["chunk"]
                    latencies_ms.append((arrived - float(chunk)) * 1000)
                elif line.startswith("data:") and event == "completed":
                    status = json.loads(line[len("data:") :]).get("status")
                    if status != "succeeded":
                        raise RuntimeError(f"{base}: the prediction ended {status}")
    if len(latencies_ms) != chunks:
        raise RuntimeError(f"{base}: {len(latencies_ms)} chunks arrived, expected {chunks}")
    return latencies_ms


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def summarize(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "chunks": float(len(latencies_ms)),
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms),
    }


def mark_streaming(model_dir: str) -> None:
    """Cog 0.23.1 allows SSE only when its schema says so (``cog build`` writes the mark from
    @cog.streaming): ``x-cog-streaming: true`` on ``POST /predictions``."""
    path = os.path.join(model_dir, ".cog", "openapi_schema.json")
    with open(path) as f:
        schema = json.load(f)
    schema["paths"]["/predictions"]["post"]["x-cog-streaming"] = True
    with open(path, "w") as f:
        json.dump(schema, f)


def run_one(
    what: str, model_dir: str, chunks: int, pause_ms: float, cog_venv: str
) -> dict[str, Any]:
    case = cog_compat.Case("sse latency", "predict.py:Predictor")
    if what == "cog-pool":
        server = cog_compat.pool_server(model_dir, case)
    else:
        server = cog_compat.cog_server(model_dir, case, cog_venv)
    with server as (url, proc):
        cog_compat.wait_started(url, proc, what)
        if what == "cog-pool":
            cog_compat.share_schema(url, model_dir)  # for Cog, run after this one
            mark_streaming(model_dir)
        asyncio.run(measure(url, WARMUP_CHUNKS, pause_ms))
        return summarize(asyncio.run(measure(url, chunks, pause_ms)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--pause-ms", type=float, default=1.0, help="the model's pause per chunk")
    parser.add_argument("--cog-venv", default="/work/cog-venv")
    parser.add_argument("--only", choices=["cog-pool", "cog"], help="one server")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sse-latency-") as base:
        model_dir = os.path.join(base, "sse_clock")
        shutil.copytree(MODEL, model_dir)
        for what in ("cog-pool", "cog"):
            if args.only and what != args.only and not (what == "cog-pool" and args.only == "cog"):
                continue  # Cog needs the schema cog-pool writes: cog-pool always runs first
            stats = run_one(what, model_dir, args.chunks, args.pause_ms, args.cog_venv)
            print(what, json.dumps(stats), flush=True)
            if args.only in (None, what):
                rows.append((what, stats))
    print()
    print("| server | chunks | pause per chunk (ms) | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|")
    for what, stats in rows:
        print(
            f"| {what} | {int(stats['chunks'])} | {args.pause_ms:g} | {stats['p50_ms']:.2f} "
            f"| {stats['p99_ms']:.2f} | {stats['max_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
