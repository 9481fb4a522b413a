"""``cog-pool status``: a terminal table of a running pool's runners and queue consumers.

It reads ``/health-check`` (runners, consumers) and ``/metrics`` (each runner's RSS and the
predictions it served) of the pool at ``--url``; ``--watch`` redraws every ``--interval``
seconds until Ctrl-C. With an access token (``--token``, else ``$COG_POOL_HTTP_AUTH_TOKEN``)
it sends ``Authorization: Bearer``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["PoolStatus", "fetch", "render", "status_main"]

DEFAULT_URL = "http://127.0.0.1:5000"
TOKEN_ENV = "COG_POOL_HTTP_AUTH_TOKEN"
REQUEST_TIMEOUT_S = 5.0
EXIT_UNREACHABLE = 1
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


class StatusError(Exception):
    """The pool could not be read; the message says why and what to do."""


class PoolStatus:
    """One reading of a pool: its health body plus per-runner numbers from /metrics."""

    def __init__(self, health: dict[str, Any], metrics_text: str | None) -> None:
        self.health = health
        self.rss_bytes: dict[str, float] = {}
        self.served: dict[str, float] = {}
        if metrics_text is not None:
            self._read_metrics(metrics_text)

    def _read_metrics(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                runner = sample.labels.get("runner")
                if runner is None:
                    continue
                if sample.name == "cog_pool_runner_resident_memory_bytes":
                    self.rss_bytes[runner] = sample.value
                elif sample.name == "cog_pool_runner_predictions_total":
                    self.served[runner] = sample.value

    @property
    def consumers(self) -> dict[str, dict[str, Any]]:
        """Queue consumers: the health body's members that carry a ``state`` (not ``reload``)."""
        return {
            name: value
            for name, value in self.health.items()
            if isinstance(value, dict) and "state" in value and name != "reload"
        }


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"cannot reach the pool at {url}: {reason} (is it running? --url)") from e


def fetch(url: str, token: str | None) -> PoolStatus:
    """Read ``/health-check`` and ``/metrics`` of the pool at ``url``."""
    base = url.rstrip("/")
    status, body = _get(base + "/health-check", token)
    if status != 200:
        raise StatusError(f"{base}/health-check answered {status}: {body[:200]!r}")
    try:
        health = json.loads(body)
    except ValueError as e:
        raise StatusError(f"{base}/health-check did not answer JSON: {e}") from None
    status, body = _get(base + "/metrics", token)
    if status == 401:
        raise StatusError(f"{base}/metrics needs the pool's token: pass --token or set {TOKEN_ENV}")
    metrics_text = body.decode("utf-8", "replace") if status == 200 else None
    return PoolStatus(health, metrics_text)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def render(status: PoolStatus, url: str) -> str:
    """The table as text (no trailing screen control)."""
    h = status.health
    concurrency = h.get("concurrency") or {}
    out = [
        f"pool {url}  status {h.get('status')}  "
        f"busy {_cell(concurrency.get('current'))}/{_cell(concurrency.get('max'))}"
        + ("  (shutting down)" if h.get("shutting_down") else ""),
    ]
    reload = h.get("reload")
    if isinstance(reload, dict) and reload.get("state") not in (None, "idle"):
        line = f"reload {reload.get('state')} ({_cell(reload.get('replaced'))}/"
        line += f"{_cell(reload.get('total'))} replaced)"
        if reload.get("error"):
            line += f": {reload['error']}"
        out.append(line)
    out.append("")
    rows = []
    for r in h.get("runners") or []:
        key = str(r.get("index"))
        rows.append(
            [
                key,
                "DRAINING" if r.get("draining") else _cell(r.get("status")),
                "cpu" if r.get("gpu") is None else str(r["gpu"]),
                _cell(r.get("pid")),
                f"{_cell(r.get('busy'))}/{_cell(r.get('capacity'))}",
                _cell(r.get("restarts")),
                _mib(status.rss_bytes.get(key)),
                _cell(status.served.get(key, 0 if status.served or status.rss_bytes else None)),
            ]
        )
    out += _table(["RUNNER", "STATE", "GPU", "PID", "BUSY", "RESTARTS", "RSS", "SERVED"], rows)
    consumers = status.consumers
    if consumers:
        out.append("")
        crows = [
            [
                name,
                _cell(c.get("state")),
                _cell(c.get("stream") or c.get("queue")),
                _cell(c.get("in_flight")),
                _cell(c.get("pending")),
                _cell(c.get("lag", c.get("queue_depth"))),
                _cell(c.get("completed")),
                _cell(c.get("last_error")),
            ]
            for name, c in sorted(consumers.items())
        ]
        out += _table(
            ["CONSUMER", "STATE", "SOURCE", "IN_FLIGHT", "PENDING", "LAG", "DONE", "LAST_ERROR"],
            crows,
        )
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cog-pool status", description="show a running pool's runners and queue consumers"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the pool (default {DEFAULT_URL})")
    parser.add_argument("--token", help=f"the pool's http.auth_token (default: ${TOKEN_ENV})")
    parser.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws (default 2)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw health body")
    return parser


def status_main(argv: Sequence[str], *, out: TextIO | None = None) -> int:
    """Entry point of ``cog-pool status``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    stream = out or sys.stdout
    if args.interval <= 0:
        print("cog-pool status: --interval must be > 0", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    clear = args.watch and stream.isatty()
    try:
        while True:
            try:
                reading = fetch(args.url, token)
            except StatusError as e:
                print(f"cog-pool status: {e}", file=sys.stderr)
                if not args.watch:
                    return EXIT_UNREACHABLE
            else:
                text = (
                    json.dumps(reading.health, indent=2) + "\n"
                    if args.json
                    else render(reading, args.url)
                )
                stream.write((_CLEAR if clear else "") + text)
                if args.watch and not clear:
                    stream.write("\n")
                stream.flush()
            if not args.watch:
                return 0
            time.sleep(args.interval)  # the redraw period of a terminal tool
    except KeyboardInterrupt:
        return 0
