"""The pool's configuration: frozen dataclasses, one per YAML section.

Precedence: defaults < YAML file < ``COG_POOL_*`` environment < CLI flags. Every key of
``config/pool.yaml`` maps to one field here; an unknown key, a wrong type or an impossible
value raises :class:`pool.errors.ConfigError` naming the key.

(The loader is filled in by the supervision work; the shape below is the contract the
HTTP API and the queue consumers rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "AmqpConfig",
    "FilesConfig",
    "HttpConfig",
    "ModelConfig",
    "PoolConfig",
    "QueuesConfig",
    "RedisConfig",
    "RunnersConfig",
    "ShutdownConfig",
    "WebhooksConfig",
]


@dataclass(frozen=True)
class ModelConfig:
    path: str = "examples/hello"  # model directory holding cog.yaml
    python: str | None = None  # interpreter of the model's own environment; None: the pool's
    predict: str | None = None  # "predict.py:Predictor"; None: read from cog.yaml


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    max_body_bytes: int = 100 * 1024 * 1024
    queue_limit: int = 1024
    reject_when_busy: bool = False
    retry_after_s: int = 1
    recent_ttl_s: float = 600.0  # how long finished predictions stay readable / idempotent
    recent_max: int = 10_000


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


@dataclass(frozen=True)
class QueuesConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)


@dataclass(frozen=True)
class ShutdownConfig:
    grace_s: float = 30.0


@dataclass(frozen=True)
class PoolConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    runners: RunnersConfig = field(default_factory=RunnersConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    state_dir: str | None = None  # None: /dev/shm/cog-pool-<pid> when /dev/shm exists, else tmp
    log_level: str = "info"
