"""Log output: ``text`` lines (``time LEVEL logger event key=value ...``) or ``json`` objects.

Every lifecycle line of the pool is ``event key=value ...`` shaped (STYLE 11). The JSON format
carries the same fields, one object per line, for log shippers: ``time``, ``level``,
``logger``, ``event`` and one member per ``key=value`` pair (integers, numbers, booleans and
None as JSON values; everything else as the text it has in the line). A message that is not
event-shaped (a library's prose) goes whole into ``message``; a traceback into ``exception``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any, TextIO

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure_logging", "parse_event"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Where a " key=" starts; a value runs to the next one (values may hold spaces: reprs).
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_.]*)=")
_EVENT = re.compile(r"^[a-z][a-z0-9_]*$")
_INT = re.compile(r"^-?\d{1,18}$")
_FLOAT = re.compile(r"^-?\d+\.\d+(?:[eE][-+]?\d+)?$")
_WORDS = {"None": None, "True": True, "False": False}
# Members the formatter writes itself: a pair with one of these names keeps a "field_" prefix.
_RESERVED = frozenset({"time", "level", "logger", "event", "message", "exception"})


def _value(text: str) -> Any:
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return _WORDS.get(text, text)


def parse_event(message: str) -> tuple[str, dict[str, Any]] | None:
    """``"event a=1 b=x y"`` -> ``("event", {"a": 1, "b": "x y"})``; None when not that shape."""
    keys = list(_KEY.finditer(message))
    event = message[: keys[0].start()].strip() if keys else message.strip()
    if not _EVENT.match(event):
        return None
    fields: dict[str, Any] = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(message)
        fields[m.group(1)] = _value(message[m.end() : end].rstrip())
    return event, fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        parsed = parse_event(message)
        if parsed is None:
            out["message"] = message
        else:
            out["event"] = parsed[0]
            for key, value in parsed[1].items():
                out[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        # default=str: a value is text already, but a library's extra may not be.
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str, stream: TextIO) -> None:
    """Send every logger's records to ``stream`` as ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
