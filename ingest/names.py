"""Queue-side names: Redis fields and keys, AMQP headers. Defined once, imported everywhere.

Both the consumers and ``cog-pool submit`` (and the tests) use these, so a producer written
against this module and the pool always agree on the wire format.
"""

from __future__ import annotations

import re

__all__ = [
    "AMQP_DEAD_REASON_HEADER",
    "AMQP_DELIVERY_COUNT_HEADER",
    "AMQP_DELIVERY_LIMIT_HEADROOM",
    "FIELD_BASE64_SUFFIX",
    "FIELD_EVENT",
    "FIELD_ID",
    "FIELD_ORIGINAL_ID",
    "FIELD_REASON",
    "FIELD_VALUE",
    "REASON_INTERNAL",
    "REASON_INVALID_JSON",
    "REASON_INVALID_REPLY_TO",
    "REASON_INVALID_REQUEST",
    "REASON_MAX_DELIVERIES",
    "REASON_MISSING_VALUE",
    "REASON_TOO_LARGE",
    "REASON_UNROUTABLE",
    "dead_stream_name",
    "default_reply_prefix",
    "deliveries_key",
    "published_key",
    "result_key",
    "safe_id",
]

# Redis stream entry fields.
FIELD_VALUE = "value"  # the request (XADD <stream>) or the prediction JSON (XADD <results>)
FIELD_ID = "id"  # prediction id on result entries
FIELD_EVENT = "event"  # on result entries: "completed", or start/output/logs when progress is on
FIELD_REASON = "reason"  # on dead-letter entries
FIELD_ORIGINAL_ID = "original_id"  # on dead-letter entries: the request entry's id
# On dead-letter entries: a field whose value was not UTF-8, base64-encoded ("value_base64").
FIELD_BASE64_SUFFIX = "_base64"

# AMQP headers.
AMQP_DEAD_REASON_HEADER = "x-cog-dead-reason"
# Quorum queues count returns (nack/requeue, channel closed with the message unacked).
AMQP_DELIVERY_COUNT_HEADER = "x-delivery-count"
# The broker's own x-delivery-limit is set this far above max_deliveries, so our consumer
# (which dead-letters with a reason) always sees an over-delivered message before the broker
# drops it to the DLX on its own (which would carry no reason of ours).
AMQP_DELIVERY_LIMIT_HEADROOM = 2

# Dead-letter reasons (the prefix of the reason text; details follow after ": ").
REASON_INVALID_JSON = "invalid JSON"
REASON_INVALID_REQUEST = "invalid request"
REASON_MISSING_VALUE = "missing value field"
REASON_TOO_LARGE = "message too large"
REASON_MAX_DELIVERIES = "delivered too many times"
REASON_INVALID_REPLY_TO = "invalid reply_to"
REASON_UNROUTABLE = "reply not routable"
REASON_INTERNAL = "internal error"
REASON_INVALID_PROPERTIES = "invalid message properties"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def dead_stream_name(stream: str, configured: str | None = None) -> str:
    """The dead-letter stream of ``stream``: the configured name, else ``<stream>:dead``."""
    return configured or f"{stream}:dead"


def result_key(prefix: str, prediction_id: str) -> str:
    """Redis key holding the terminal prediction JSON of one id (the idempotency record)."""
    return f"{prefix}:result:{prediction_id}"


def deliveries_key(prefix: str, prediction_id: str) -> str:
    """Redis key counting deliveries of one id (AMQP on classic queues, which lack a count)."""
    return f"{prefix}:deliveries:{prediction_id}"


def default_reply_prefix(stream: str) -> str:
    """The keys a Redis message's ``reply_to`` may name when no prefix is configured."""
    return f"{stream}:reply:"


def published_key(prefix: str, prediction_id: str) -> str:
    """Redis key marking that the result of one id was confirmed by the broker (AMQP)."""
    return f"{prefix}:published:{prediction_id}"


def safe_id(raw: str) -> str:
    """Map a broker's message id (Redis entry id, AMQP message id) into the prediction id
    alphabet, deterministically, so a redelivery gets the same prediction id."""
    cleaned = _UNSAFE.sub("_", raw).lstrip("._-")[:128]
    return cleaned or "msg"
