"""The pool's configuration: frozen dataclasses, one per YAML section.

Precedence: defaults < YAML file < ``COG_POOL_*`` environment < CLI flags. Every key of
``config/pool.yaml`` maps to one field here; an unknown key, a wrong type or an impossible
value raises :class:`pool.errors.ConfigError` naming the key.

The loader also reads the model's ``cog.yaml`` (``predict`` or ``run``, ``train``,
``concurrency.max``, ``environment``) and fills ``model.predict``, ``model.train``,
``runners.max_concurrency`` and ``runners.env`` with the effective values, resolves
``runners.gpus: auto`` through ``nvidia-smi -L`` and makes ``model.path`` absolute, so code
that receives a loaded :class:`PoolConfig` never has to look anything up again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pool.errors import ConfigError

__all__ = [
    "AmqpConfig",
    "FilesConfig",
    "HttpConfig",
    "LoggingConfig",
    "ModelConfig",
    "NetworkConfig",
    "PoolConfig",
    "PredictionsConfig",
    "QueuesConfig",
    "RedisConfig",
    "RunnersConfig",
    "ShutdownConfig",
    "WebhooksConfig",
    "detect_gpus",
    "env_var_name",
    "load_config",
    "project_root",
]


@dataclass(frozen=True)
class ModelConfig:
    path: str = "examples/hello"  # model directory holding cog.yaml
    python: str | None = None  # interpreter of the model's own environment; None: the pool's
    predict: str | None = None  # "predict.py:Predictor"; None: read from cog.yaml
    train: str | None = None  # "train.py:train"; None: cog.yaml's train:, if any


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    max_body_bytes: int = 100 * 1024 * 1024
    queue_limit: int = 1024
    reject_when_busy: bool = False
    retry_after_s: int = 1
    allow_shutdown: bool = False  # POST /shutdown: off unless the operator turns it on
    # The HTTP server's own limits (pool/server.py): slow or idle clients cannot hold it.
    max_connections: int = 1000  # open client connections; beyond it new ones get 503
    header_timeout_s: float = 15.0  # a new connection's first request headers, complete
    body_timeout_s: float = 120.0  # a request body, complete, once its headers are in
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection between requests
    error_log_interval_s: float = 10.0  # connection errors: one log line per kind per this
    # Bearer token every route but the probes needs; set it whenever the pool listens beyond
    # loopback. auth_token_file: a file holding it (a mounted secret), read at start.
    auth_token: str | None = None
    auth_token_file: str | None = None
    metrics_public: bool = False  # true: /metrics answers without the token
    live_tick_age_s: float = 10.0  # /health/live fails once the supervisor loop is this stale
    # SSE (@cog.streaming models): events a second subscriber may replay; 0: no replay.
    # Cog's COG_STREAM_HISTORY_CAPACITY sets it too (COG_POOL_HTTP_... wins).
    stream_history_capacity: int = 1000


@dataclass(frozen=True)
class RunnersConfig:
    gpus: tuple[str, ...] | None = None  # None: CPU-only, use count; ("auto",) resolved at load
    per_gpu: int = 1
    count: int = 1
    max_concurrency: int | None = None  # None: cog.yaml concurrency.max, else 1
    setup_timeout_s: float | None = None
    predict_timeout_s: float | None = None
    cancel_grace_s: float = 5.0
    max_restarts: int = 5
    restart_window_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stop_grace_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)
    max_predictions: int | None = None  # None: no recycle by count
    max_rss_mb: float | None = None  # None: no recycle by memory
    max_failed_ticks: int = 10  # consecutive failing supervisor ticks, then exit non-zero
    max_runners: int | None = None  # run-time scaling bound; None: twice the configured runners
    healthcheck_interval_s: float = 5.0  # seconds between a runner's user healthcheck() calls
    healthcheck_max_failures: int = 3  # consecutive failed checks, then the runner is recycled


@dataclass(frozen=True)
class WebhooksConfig:
    throttle_s: float = 0.5
    timeout_s: float = 10.0
    max_attempts: int = 8
    retry_initial_s: float = 0.1
    retry_max_s: float = 10.0


@dataclass(frozen=True)
class FilesConfig:
    upload_url: str | None = None
    download_timeout_s: float = 60.0
    max_download_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class PredictionsConfig:
    """Bounds of the prediction records (``pool/prediction.py``) and the recent store."""

    recent_ttl_s: float = 600.0  # how long finished predictions stay readable / idempotent
    recent_max: int = 10_000  # ... at most this many of them
    recent_max_bytes: int = 64 * 1024 * 1024  # ... taking at most this many bytes in all
    recent_value_max_bytes: int = 256 * 1024  # a kept input value/output/logs larger: omitted
    # output files the kept copies hold on disk (pool.files.FileOutput), in all
    recent_files_max_bytes: int = 1024 * 1024 * 1024
    logs_max_bytes: int = 1024 * 1024  # one prediction's logs: head + marker + tail past this
    # What an iterator model streams into one prediction's output (its items as JSON, summed):
    # past it the prediction fails and is canceled on its runner. None: no cap.
    streamed_output_max_bytes: int | None = 100 * 1024 * 1024
    waiting_max_bytes: int = 1024 * 1024 * 1024  # inputs of predictions waiting for a slot


@dataclass(frozen=True)
class NetworkConfig:
    """Where client-chosen URLs (input files, webhooks) may connect (pool/network.py)."""

    allow_private: bool = False  # loopback, private, link-local...; never metadata addresses
    allow_hosts: tuple[str, ...] = ()  # host names ("files.internal", "*.corp") always allowed
    allow_cidrs: tuple[str, ...] = ()  # address ranges ("10.0.0.0/8", "127.0.0.1/32") allowed
    resolve_timeout_s: float = 5.0  # a webhook's host name, resolved when it is submitted


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None: consumer off
    stream: str = "cog-pool:predictions"
    group: str = "cog-pool"
    consumer: str | None = None  # None: "<hostname>-<pid>"
    results_stream: str = "cog-pool:results"
    dead_stream: str | None = None  # None: "<stream>:dead"
    block_ms: int = 1000
    claim_idle_s: float = 30.0
    max_deliveries: int = 3
    publish_progress: bool = False
    result_ttl_s: float = 86_400.0
    cancel_channel: str = "cog-pool:cancel"
    max_message_bytes: int = 10 * 1024 * 1024
    # A message's reply_to must name a key under this prefix. None: "<stream>:reply:".
    reply_to_prefix: str | None = None
    # Streams are capped (exact MAXLEN on every XADD): results and reply streams, dead letters.
    results_maxlen: int = 100_000
    dead_maxlen: int = 100_000
    # Acked request entries are deleted (XDEL): one consumer group per stream.
    delete_acked: bool = True
    # Entries read ahead per runner slot: parsed and checked while the slots are busy, so a
    # slot that frees starts its next prediction at once (0: read only what can run now).
    read_ahead_per_slot: int = 1


@dataclass(frozen=True)
class AmqpConfig:
    url: str | None = None  # None: consumer off
    queue: str = "cog-pool.predictions"
    results_exchange: str | None = None
    results_routing_key: str = "results"
    dead_letter_exchange: str = "cog-pool.dead"
    dead_letter_queue: str = "cog-pool.predictions.dead"
    cancel_exchange: str = "cog-pool.cancel"
    max_deliveries: int = 3
    max_message_bytes: int = 10 * 1024 * 1024
    result_store_redis_url: str | None = None  # None: results remembered in memory
    # Unacked messages this pool may hold. None: chosen by the pool (ingest/prefetch.py):
    # twice its runner slots (at most one message waits per slot), plus room for finished
    # messages whose results are still being confirmed when predictions are so short that
    # the slots would otherwise idle; never more than prefetch_max_per_slot per slot.
    prefetch: int | None = None
    prefetch_max_per_slot: int = 4
    # The in-memory result store (no result_store_redis_url): bounded in count and in bytes.
    result_store_max_entries: int = 100_000
    result_store_max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class QueuesConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)


@dataclass(frozen=True)
class ShutdownConfig:
    grace_s: float = 30.0


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"  # text: "time LEVEL logger event k=v"; json: one object per line


@dataclass(frozen=True)
class PoolConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    predictions: PredictionsConfig = field(default_factory=PredictionsConfig)
    runners: RunnersConfig = field(default_factory=RunnersConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    state_dir: str | None = None  # None: /dev/shm/cog-pool-<pid> when /dev/shm exists, else tmp
    log_level: str = "info"
    # auto: uvloop when it imports (less CPU per request on the loop), else asyncio's own loop.
    event_loop: str = "auto"


# --- loading -----------------------------------------------------------------------------------
ENV_PREFIX = "COG_POOL_"
# Environment variables with the prefix that are not config keys (the CLI reads this one).
ENV_NOT_KEYS = frozenset({"COG_POOL_CONFIG"})
DEFAULT_MODEL_PATH = ModelConfig.path
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def project_root() -> str:
    """The directory holding ``pool/``, ``examples/`` and ``config/`` (a clone, or editable)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_var_name(key: str) -> str:
    """``http.port`` -> ``COG_POOL_HTTP_PORT``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config tree with its field type (nested sections flattened)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(typing.cast(type, tp), key + "."))
        else:
            out[key] = tp
    return out


_KEYS: dict[str, Any] = _leaf_types(PoolConfig)
# Keys that moved: a config that still uses one is told where it went.
_MOVED = {
    "http.recent_ttl_s": "predictions.recent_ttl_s",
    "http.recent_max": "predictions.recent_max",
}
_ENV_KEYS: dict[str, str] = {env_var_name(k): k for k in _KEYS}


class _Value(typing.NamedTuple):
    raw: Any
    source: str  # where it came from, for error messages
    from_text: bool  # an environment string (or a CLI string) to parse by the field's type


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list of strings"
    if origin is dict:
        return "a mapping of strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: _Value, tp: Any) -> Any:
    """Turn one raw value into the field's type, or raise ConfigError naming the key."""
    inner, optional = _unwrap_optional(tp)
    raw = value.raw
    if raw is None or (value.from_text and raw == "" and optional):
        if optional:
            return None
        raise ConfigError(key, f"must be {_type_name(inner)}, not null ({value.source})")
    try:
        return _coerce_inner(inner, raw, value.from_text)
    except (TypeError, ValueError) as e:
        shown = repr(raw) if len(repr(raw)) < 80 else repr(raw)[:77] + "..."
        raise ConfigError(key, f"must be {_type_name(inner)}, got {shown} ({value.source})") from e


def _coerce_inner(tp: Any, raw: Any, from_text: bool) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise TypeError
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            return int(raw.strip())
        raise TypeError
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_text and isinstance(raw, str):
            return float(raw.strip())
        raise TypeError
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise TypeError
    if origin is tuple:
        return _coerce_str_list(raw)
    if origin is dict:
        return _coerce_str_map(raw, from_text)
    raise TypeError(f"unsupported config type {tp}")


def _coerce_str_list(raw: Any) -> tuple[str, ...]:
    # "0,1" (environment, CLI) and [0, 1] (YAML) both mean GPUs 0 and 1.
    if isinstance(raw, str):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if isinstance(raw, int) and not isinstance(raw, bool):
        return (str(raw),)
    if isinstance(raw, (list, tuple)) and all(
        isinstance(x, (str, int)) and not isinstance(x, bool) for x in raw
    ):
        return tuple(str(x).strip() for x in raw)
    raise TypeError


def _coerce_str_map(raw: Any, from_text: bool) -> dict[str, str]:
    if from_text and isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else {}
    if not isinstance(raw, Mapping):
        raise TypeError
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, (Mapping, list)) or v is None:
            raise TypeError
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _flatten_yaml(data: Any, where: str, prefix: str = "") -> dict[str, _Value]:
    """YAML mapping -> {dotted key: value}; unknown keys and non-mapping sections fail."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "(top level)", f"must be a mapping ({where})")
    out: dict[str, _Value] = {}
    for name, sub in data.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str):
            raise ConfigError(key, f"keys must be strings ({where})")
        if key in _MOVED:
            raise ConfigError(key, f"moved to {_MOVED[key]} ({where})")
        if key in _KEYS:
            out[key] = _Value(sub, where, False)
        elif any(k.startswith(key + ".") for k in _KEYS):
            out.update(_flatten_yaml({} if sub is None else sub, where, key + "."))
        else:
            raise ConfigError(key, f"unknown key ({where}); known keys here: {_siblings(prefix)}")
    return out


def _siblings(prefix: str) -> str:
    names = {k[len(prefix) :].split(".")[0] for k in _KEYS if k.startswith(prefix)}
    return ", ".join(sorted(names))


def _read_yaml(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, f"{what} not found") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read {what}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, f"malformed YAML in {what}{at}: {problem}") from None


def _collect(
    path: str | None, env: Mapping[str, str], overrides: Mapping[str, Any]
) -> dict[str, _Value]:
    """Merge the sources in precedence order: YAML < environment < overrides."""
    values: dict[str, _Value] = {}
    if path is not None:
        data = _read_yaml(path, "pool config")
        if data is not None:
            values.update(_flatten_yaml(data, f"in {path}"))
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            raise ConfigError(name, "unknown environment variable (no such config key)")
        values[key] = _Value(text, f"from environment variable {name}", True)
    for key, raw in overrides.items():
        if raw is None:  # an option the CLI did not get
            continue
        if key not in _KEYS:
            raise ConfigError(key, "unknown key (from a command-line override)")
        values[key] = _Value(raw, "from the command line", isinstance(raw, str))
    return values


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


# (dotted key, check, what the value must be); None values skip the check.
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("http.port", lambda v: 0 <= v <= 65535, "between 0 and 65535 (0: any free port)"),
    ("http.max_body_bytes", lambda v: v > 0, "> 0"),
    ("http.queue_limit", lambda v: v >= 0, ">= 0"),
    ("http.retry_after_s", lambda v: v >= 0, ">= 0"),
    ("predictions.recent_ttl_s", lambda v: v >= 0, ">= 0"),
    ("predictions.recent_max", lambda v: v >= 0, ">= 0"),
    ("predictions.recent_max_bytes", lambda v: v >= 0, ">= 0"),
    ("predictions.recent_value_max_bytes", lambda v: v >= 0, ">= 0"),
    ("predictions.recent_files_max_bytes", lambda v: v >= 0, ">= 0"),
    ("predictions.logs_max_bytes", lambda v: v >= 1024, ">= 1024"),
    ("predictions.streamed_output_max_bytes", lambda v: v >= 1, ">= 1 (null: no cap)"),
    ("predictions.waiting_max_bytes", lambda v: v >= 0, ">= 0"),
    ("http.max_connections", lambda v: v >= 1, ">= 1"),
    ("http.header_timeout_s", lambda v: v > 0, "> 0"),
    ("http.body_timeout_s", lambda v: v > 0, "> 0"),
    ("http.keepalive_timeout_s", lambda v: v > 0, "> 0"),
    ("http.error_log_interval_s", lambda v: v > 0, "> 0"),
    (
        "http.auth_token",
        lambda v: v.strip() != "" and v == v.strip(),
        "a non-empty token without surrounding whitespace",
    ),
    ("http.live_tick_age_s", lambda v: v > 0, "> 0"),
    ("http.stream_history_capacity", lambda v: v >= 0, ">= 0"),
    ("logging.format", lambda v: v in LOG_FORMATS, f"one of {', '.join(LOG_FORMATS)}"),
    ("runners.per_gpu", lambda v: v >= 1, ">= 1"),
    ("runners.count", lambda v: v >= 1, ">= 1"),
    ("runners.max_concurrency", lambda v: v >= 1, ">= 1"),
    ("runners.setup_timeout_s", lambda v: v > 0, "> 0"),
    ("runners.predict_timeout_s", lambda v: v > 0, "> 0"),
    ("runners.cancel_grace_s", lambda v: v >= 0, ">= 0"),
    ("runners.max_restarts", lambda v: v >= 0, ">= 0"),
    ("runners.restart_window_s", lambda v: v > 0, "> 0"),
    ("runners.backoff_initial_s", lambda v: v >= 0, ">= 0"),
    ("runners.backoff_max_s", lambda v: v >= 0, ">= 0"),
    ("runners.stop_grace_s", lambda v: v >= 0, ">= 0"),
    ("runners.max_predictions", lambda v: v >= 1, ">= 1"),
    ("runners.max_rss_mb", lambda v: v > 0, "> 0"),
    ("runners.max_failed_ticks", lambda v: v >= 1, ">= 1"),
    ("runners.max_runners", lambda v: v >= 1, ">= 1"),
    ("runners.healthcheck_interval_s", lambda v: v > 0, "> 0"),
    ("runners.healthcheck_max_failures", lambda v: v >= 1, ">= 1"),
    ("webhooks.throttle_s", lambda v: v >= 0, ">= 0"),
    ("webhooks.timeout_s", lambda v: v > 0, "> 0"),
    ("webhooks.max_attempts", lambda v: v >= 1, ">= 1"),
    ("webhooks.retry_initial_s", lambda v: v >= 0, ">= 0"),
    ("webhooks.retry_max_s", lambda v: v >= 0, ">= 0"),
    ("files.download_timeout_s", lambda v: v > 0, "> 0"),
    ("network.resolve_timeout_s", lambda v: v > 0, "> 0"),
    ("files.max_download_bytes", lambda v: v > 0, "> 0"),
    ("queues.redis.block_ms", lambda v: v >= 0, ">= 0"),
    ("queues.redis.claim_idle_s", lambda v: v > 0, "> 0"),
    ("queues.redis.max_deliveries", lambda v: v >= 1, ">= 1"),
    ("queues.redis.result_ttl_s", lambda v: v > 0, "> 0"),
    ("queues.redis.max_message_bytes", lambda v: v > 0, "> 0"),
    ("queues.redis.results_maxlen", lambda v: v >= 1, ">= 1"),
    ("queues.redis.dead_maxlen", lambda v: v >= 1, ">= 1"),
    ("queues.amqp.max_deliveries", lambda v: v >= 1, ">= 1"),
    ("queues.amqp.result_store_max_entries", lambda v: v >= 1, ">= 1"),
    ("queues.amqp.result_store_max_bytes", lambda v: v >= 1, ">= 1"),
    ("queues.amqp.prefetch", lambda v: 1 <= v <= 65535, "between 1 and 65535"),
    ("queues.amqp.prefetch_max_per_slot", lambda v: 2 <= v <= 64, "between 2 and 64"),
    ("queues.redis.read_ahead_per_slot", lambda v: 0 <= v <= 16, "between 0 and 16"),
    ("queues.amqp.max_message_bytes", lambda v: v > 0, "> 0"),
    ("shutdown.grace_s", lambda v: v >= 0, ">= 0"),
    ("log_level", lambda v: v in LOG_LEVELS, f"one of {', '.join(LOG_LEVELS)}"),
    ("event_loop", lambda v: v in EVENT_LOOPS, f"one of {', '.join(EVENT_LOOPS)}"),
    (
        "queues.redis.url",
        lambda v: v.startswith(("redis://", "rediss://", "unix://")),
        "a redis:// URL",
    ),
    ("queues.amqp.url", lambda v: v.startswith(("amqp://", "amqps://")), "an amqp:// URL"),
    ("files.upload_url", lambda v: v.startswith(("http://", "https://")), "an http(s) URL"),
]


def _check_rules(flat: dict[str, Any], sources: dict[str, _Value]) -> None:
    for key, ok, must in _RULES:
        v = flat.get(key)
        if v is None:
            continue
        if isinstance(v, float) and v != v:  # NaN passes no comparison honestly
            ok_ = False
        else:
            ok_ = ok(v)
        if not ok_:
            where = f" ({sources[key].source})" if key in sources else ""
            raise ConfigError(key, f"must be {must}, got {v!r}{where}")
    _check_backoff(flat)
    _check_cidrs(flat.get("network.allow_cidrs") or ())
    _check_gpus(flat.get("runners.gpus"))
    if "CUDA_VISIBLE_DEVICES" in (flat.get("runners.env") or {}):
        raise ConfigError(
            "runners.env",
            "must not set CUDA_VISIBLE_DEVICES: each runner gets its own from runners.gpus",
        )


def _check_backoff(flat: dict[str, Any]) -> None:
    initial = flat.get("runners.backoff_initial_s", RunnersConfig.backoff_initial_s)
    most = flat.get("runners.backoff_max_s", RunnersConfig.backoff_max_s)
    if most < initial:
        raise ConfigError(
            "runners.backoff_max_s", f"must be >= runners.backoff_initial_s ({initial})"
        )


def _check_cidrs(cidrs: tuple[str, ...]) -> None:
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                "network.allow_cidrs",
                f"{cidr!r} is not an address or a range like 10.0.0.0/8 or fd00::/8",
            ) from None


def _check_gpus(gpus: tuple[str, ...] | None) -> None:
    if gpus is None:
        return
    if gpus == ("auto",):
        return
    for g in gpus:
        if not g or any(c.isspace() for c in g) or g == "auto":
            raise ConfigError("runners.gpus", f"invalid GPU id {g!r}: use ids like 0,1 or 'auto'")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(
            "runners.gpus", f"lists a GPU twice ({','.join(gpus)}): use runners.per_gpu instead"
        )


def detect_gpus(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """GPU indices from ``nvidia-smi -L`` (None when nvidia-smi is absent or sees no GPU)."""
    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError("runners.gpus", f"auto: running {exe} -L failed: {e}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise ConfigError(
            "runners.gpus",
            f"auto: {exe} -L exited with {done.returncode}: {detail[0]} "
            "(list the GPUs explicitly, or remove runners.gpus for CPU-only runners)",
        )
    count = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(count)) or None


@dataclass(frozen=True)
class _CogYaml:
    predict: str
    train: str | None = None
    concurrency_max: int | None = None
    environment: dict[str, str] = field(default_factory=dict)


def _read_cog_yaml(model_dir: str, predict: str | None) -> _CogYaml:
    """What the pool takes from ``<model_dir>/cog.yaml``."""
    path = os.path.join(model_dir, "cog.yaml")
    if not os.path.exists(path) and predict is not None:
        return _CogYaml(predict)  # model.predict given: a cog.yaml is optional
    if not os.path.exists(path):
        raise ConfigError(
            path,
            "cog.yaml not found: the model directory (model.path) needs a cog.yaml with "
            'predict: "predict.py:Predictor", or set model.predict',
        )
    data = _read_yaml(path, "cog.yaml")
    if not isinstance(data, Mapping):
        raise ConfigError(path, "cog.yaml must be a mapping with a `predict` key")
    if data.get("predict") is not None and data.get("run") is not None:
        raise ConfigError(path, "set either predict or run in cog.yaml, not both")
    # Cog 0.23 spells it `run: "run.py:Runner"`; `predict:` keeps working.
    key = "run" if data.get("run") is not None else "predict"
    ref = predict if predict is not None else data.get(key)
    if not isinstance(ref, str) or ":" not in ref:
        raise ConfigError(path, f'{key} must be "file.py:Name" (got {data.get(key)!r}) in cog.yaml')
    train = data.get("train")
    if train is not None and (not isinstance(train, str) or ":" not in train):
        raise ConfigError(path, f'train must be "file.py:name" (got {train!r}) in cog.yaml')
    concurrency = data.get("concurrency") or {}
    if not isinstance(concurrency, Mapping):
        raise ConfigError(path, "concurrency must be a mapping like {max: 4} in cog.yaml")
    most = concurrency.get("max")
    if most is not None and (not isinstance(most, int) or isinstance(most, bool) or most < 1):
        raise ConfigError(path, f"concurrency.max must be an integer >= 1 (got {most!r})")
    return _CogYaml(ref, train, most, _cog_environment(path, data.get("environment")))


def _cog_environment(path: str, entries: Any) -> dict[str, str]:
    """cog.yaml's ``environment:`` list of ``NAME=value`` strings (e.g. COG_SETUP_TIMEOUT)."""
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise ConfigError(path, "environment must be a list of NAME=value strings in cog.yaml")
    env: dict[str, str] = {}
    for entry in entries:
        name, sep, value = entry.partition("=") if isinstance(entry, str) else ("", "", "")
        if not sep or not name:
            raise ConfigError(
                path, f"environment entries must be NAME=value strings (got {entry!r}) in cog.yaml"
            )
        env[name] = value
    return env


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PoolConfig:
    """Load, merge, check and resolve the configuration (defaults < YAML < env < overrides).

    ``overrides`` take dotted keys (``{"http.port": 5001}``); a None value means "not given".
    Raises :class:`ConfigError` naming the key (and the file or variable it came from).
    """
    env = os.environ if env is None else env
    env = _with_cog_env(env)
    sources = _collect(path, env, overrides or {})
    flat = {key: _coerce(key, value, _KEYS[key]) for key, value in sources.items()}
    _check_rules(flat, sources)
    if flat.get("runners.gpus") == ("auto",):
        flat["runners.gpus"] = detect_gpus(env)
    _check_max_runners(flat)
    flat["model.path"] = _model_dir(flat.get("model.path"))
    model_dir = flat["model.path"]
    if not os.path.isdir(model_dir):
        raise ConfigError("model.path", f"model directory {model_dir} does not exist")
    cog_yaml = _read_cog_yaml(model_dir, flat.get("model.predict"))
    flat["model.predict"] = cog_yaml.predict
    if flat.get("model.train") is None:
        flat["model.train"] = cog_yaml.train
    if flat.get("runners.max_concurrency") is None:
        flat["runners.max_concurrency"] = cog_yaml.concurrency_max or 1
    if cog_yaml.environment:
        # The pool's own runners.env wins over the model's cog.yaml environment:.
        flat["runners.env"] = {**cog_yaml.environment, **(flat.get("runners.env") or {})}
    if flat.get("model.python") is not None:
        flat["model.python"] = _interpreter(flat["model.python"], env)
    if flat.get("state_dir") is not None:
        flat["state_dir"] = os.path.abspath(flat["state_dir"])
    if flat.get("http.auth_token_file") is not None:
        flat["http.auth_token"] = _token_from_file(flat)
    return typing.cast(PoolConfig, _build(PoolConfig, flat))


def _check_max_runners(flat: dict[str, Any]) -> None:
    most = flat.get("runners.max_runners")
    if most is None:
        return
    gpus = flat.get("runners.gpus")
    if gpus:
        configured = len(gpus) * flat.get("runners.per_gpu", RunnersConfig.per_gpu)
    else:
        configured = flat.get("runners.count", RunnersConfig.count)
    if most < configured:
        raise ConfigError(
            "runners.max_runners",
            f"must be >= the configured runners ({configured}), got {most}",
        )


# Cog's own variables that set a pool key (when its COG_POOL_* variable is not set).
COG_ENV_ALIASES = {"COG_STREAM_HISTORY_CAPACITY": "http.stream_history_capacity"}


def _with_cog_env(env: Mapping[str, str]) -> Mapping[str, str]:
    extra = {
        env_var_name(key): env[cog_name]
        for cog_name, key in COG_ENV_ALIASES.items()
        if cog_name in env and env_var_name(key) not in env
    }
    return {**env, **extra} if extra else env


def _token_from_file(flat: dict[str, Any]) -> str:
    path = os.path.abspath(os.path.expanduser(flat["http.auth_token_file"]))
    if flat.get("http.auth_token") is not None:
        raise ConfigError(
            "http.auth_token_file", "set either http.auth_token or http.auth_token_file, not both"
        )
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(
            "http.auth_token_file", f"cannot read the token file {path}: {e.strerror}"
        ) from None
    if not token:
        raise ConfigError("http.auth_token_file", f"the token file {path} is empty")
    return token


def _model_dir(given: str | None) -> str:
    # The default names the bundled example, so it is found from any working directory;
    # a path the operator gives is relative to where they run the command.
    if given is None:
        return os.path.join(project_root(), DEFAULT_MODEL_PATH)
    return os.path.abspath(os.path.expanduser(given))


def _interpreter(python: str, env: Mapping[str, str]) -> str:
    # Found now, not at the first spawn: a typo here would otherwise surface as a restart loop.
    found = shutil.which(os.path.expanduser(python), path=env.get("PATH", os.defpath))
    if found is None:
        raise ConfigError("model.python", f"interpreter {python!r} not found or not executable")
    return os.path.abspath(found) if os.sep in python else found
