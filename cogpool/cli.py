"""The ``cog-pool`` command: ``serve`` a model, or print the effective ``config``.

``cog-pool reload`` and ``cog-pool scale +1|-1`` ask a running pool to replace its runners
or add/remove one (``pool/control.py``).

``cog-pool serve [MODEL_DIR]`` loads the configuration (defaults < ``--config`` YAML <
``COG_POOL_*`` environment < flags), starts the runners, serves the HTTP API and the queue
consumers that are configured, and on SIGTERM, SIGINT or ``POST /shutdown`` drains (DESIGN §7)
and exits 0 with no child left. Other exits: 2 a configuration error, 3 the state dir is held
by another live pool, 4 the supervisor's pass kept failing (drained first).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pool.aio import loop_factory, loop_name, wait_first
from pool.config import PoolConfig, load_config
from pool.errors import ConfigError
from pool.manager import PoolManager
from pool.statedir import StateDirBusy

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("cogpool.cli")

EXIT_CONFIG = 2
EXIT_STATE_DIR_BUSY = 3  # another live pool holds the state dir's lock
EXIT_SUPERVISOR_FAILED = 4  # the supervisor's pass kept failing: let an orchestrator restart us
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


_DELEGATED_COMMANDS = {
    "status": "show a running pool's runners and queue consumers",
    "reload": "replace a running pool's runners one at a time (new code and weights)",
    "scale": "add (+1) or drain away (-1) one runner of a running pool",
    "submit": "push one prediction to a Redis stream or AMQP queue and print its result",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cog-pool", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "serve a model over HTTP and the configured queues"),
        ("config", "print the effective configuration as JSON and exit"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "model_dir",
            nargs="?",
            metavar="MODEL_DIR",
            help="model directory with cog.yaml (default: model.path, else examples/hello)",
        )
        p.add_argument("--config", help="pool YAML file (default: $COG_POOL_CONFIG)")
        p.add_argument("--host", help="http.host")
        p.add_argument("--port", type=int, help="http.port (0: any free port)")
        p.add_argument("--gpus", help='runners.gpus: "0,1" or "auto"')
        p.add_argument("--runners", type=int, help="runners.count (CPU-only runners)")
        p.add_argument("--per-gpu", type=int, help="runners.per_gpu")
        p.add_argument("--python", help="model.python: the model environment's interpreter")
        p.add_argument("--redis-url", help="queues.redis.url (enables the Redis consumer)")
        p.add_argument("--amqp-url", help="queues.amqp.url (enables the AMQP consumer)")
        p.add_argument("--state-dir", help="state_dir: runner working directories")
        p.add_argument("--log-level", help="log_level: debug, info, warning, error")
        p.add_argument("--event-loop", help="event_loop: auto, asyncio, uvloop")
    # Listed for --help; their own parsers (pool/status.py, ingest/submit.py) read the arguments.
    for name, what in _DELEGATED_COMMANDS.items():
        sub.add_parser(name, help=what, add_help=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model.path": args.model_dir,
        "http.host": args.host,
        "http.port": args.port,
        "runners.gpus": args.gpus,
        "runners.count": args.runners,
        "runners.per_gpu": args.per_gpu,
        "model.python": args.python,
        "queues.redis.url": args.redis_url,
        "queues.amqp.url": args.amqp_url,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
        "event_loop": args.event_loop,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:
        from ingest.submit import submit_main

        return submit_main(argv[1:])
    if argv[:1] in (["reload"], ["scale"]):
        from pool.control import control_main

        return control_main(argv[0], argv[1:])
    if argv[:1] == ["status"]:
        from pool.status import status_main

        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    config_path = args.config or os.environ.get("COG_POOL_CONFIG") or None
    try:
        config = load_config(config_path, env=os.environ, overrides=_overrides(args))
        # Resolved now, not when the loop starts: a missing uvloop is a configuration error.
        new_loop = loop_factory(config.event_loop)
    except ConfigError as e:
        print(f"cog-pool: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        shown = dataclasses.asdict(config)
        if shown["http"]["auth_token"] is not None:  # a secret: say it is set, never print it
            shown["http"]["auth_token"] = "<set>"
        print(json.dumps(shown, indent=2))
        return 0
    from pool.logs import configure_logging

    configure_logging(config.log_level, config.logging.format, sys.stderr)
    try:
        # A reload reads the configuration again for cog.yaml; GPUs found by `auto` are kept
        # (no nvidia-smi run on the event loop).
        overrides = {**_overrides(args), "runners.gpus": config.runners.gpus or args.gpus}
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(
                serve(
                    config,
                    config_loader=lambda: load_config(
                        config_path, env=os.environ, overrides=overrides
                    ),
                )
            )
    except StateDirBusy as e:
        print(f"cog-pool: {e}", file=sys.stderr)
        return EXIT_STATE_DIR_BUSY


async def serve(
    config: PoolConfig, *, config_loader: Callable[[], PoolConfig] | None = None
) -> int:
    """Serve until SIGTERM, SIGINT or ``POST /shutdown``; then drain and return 0."""
    loop = asyncio.get_running_loop()
    log.info("serve_starting event_loop=%s", loop_name(loop))
    stop = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(config, stop, config_loader=config_loader)
    finally:
        # Removed while the loop runs: uvloop cannot remove a handler once it has stopped
        # (the closed loop's handler would stay installed and swallow the signal).
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def _serve(
    config: PoolConfig, stop: asyncio.Event, *, config_loader: Callable[[], PoolConfig] | None
) -> int:
    from aiohttp import log as web_log
    from aiohttp import web

    from pool.api import SHUTDOWN_KEY, create_app
    from pool.metrics import Metrics
    from pool.server import start_http

    metrics = Metrics()
    manager = PoolManager(config, metrics=metrics, config_loader=config_loader)
    app = create_app(config, manager, metrics=metrics)
    # aiohttp's access line repeats prediction_finished and costs ~40 µs a request: debug only.
    access_log = web_log.access_logger if config.log_level == "debug" else None
    runner = web.AppRunner(app, handle_signals=False, access_log=access_log)
    await runner.setup()  # starts the manager (the app's cleanup_ctx)
    consumers = None
    try:
        await start_http(runner, config.http, access_log=access_log)
        for addr in runner.addresses:
            log.info("http_listening host=%s port=%s", addr[0], addr[1])
        consumers = await _start_consumers(config, manager)
        failed = manager.supervisor_failed
        await wait_first(stop.wait(), app[SHUTDOWN_KEY].wait(), failed.wait())
        reason = "supervisor_failed" if failed.is_set() else "signal" if stop.is_set() else "http"
        log.info("serve_stopping reason=%s", reason)
        app[SHUTDOWN_KEY].set()  # the HTTP API answers 503 from now on
        grace_s = config.shutdown.grace_s
        drains = [manager.shutdown(grace_s)]
        if consumers is not None:
            drains.append(consumers.stop(grace_s))
        await asyncio.gather(*drains)
    finally:
        await runner.cleanup()  # the manager's shutdown again: shared, so a no-op by now
    code = EXIT_SUPERVISOR_FAILED if manager.supervisor_failed.is_set() else 0
    log.info("serve_exit code=%d", code)
    return code


async def _start_consumers(config: PoolConfig, manager: PoolManager) -> Any:
    """Start the queue consumers ``config.queues`` enables (``ingest.start_consumers``)."""
    if not (config.queues.redis.url or config.queues.amqp.url):
        return None
    from ingest import start_consumers

    return await start_consumers(config, manager)
