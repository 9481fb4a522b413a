"""Log output: ``text`` lines (``time LEVEL logger event key=value ...``) or ``json`` objects.

Every lifecycle line of the pool is ``event key=value ...`` shaped (STYLE 11). The JSON format
carries the same fields, one object per line, for log shippers: ``time``, ``level``,
``logger``, ``event`` and one member per ``key=value`` pair (integers, numbers, booleans and
None as JSON values; everything else as the text it has in the line). The fields are read
from the format string and its arguments (``"runner_exited runner=%d error=%r"``), so a value
with spaces or ``k=v`` text in it stays one field; a message formatted some other way is
split on ``key=`` in its text. A message that is not
event-shaped (a library's prose) goes whole into ``message``; a traceback into ``exception``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any, TextIO

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "configure_logging",
    "fields_from_record",
    "parse_event",
]

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


_PLACEHOLDER = re.compile(r"%[#0 +\-]*\d*(?:\.\d+)?[sdirfgeExXo]")
_KEY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _typed(arg: Any, spec: str) -> Any:
    """One argument as the JSON value its ``key=%x`` placeholder shows in the text line."""
    if spec.endswith("s"):
        if arg is None or isinstance(arg, (bool, int)):
            return arg
        if isinstance(arg, float):
            return arg if arg == arg and arg not in (float("inf"), float("-inf")) else str(arg)
        text = str(arg)
        if len(text) >= 2 and text[0] == text[-1] == '"':  # a json.dumps'd string: its text
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text
    return _value(spec % (arg,))


def fields_from_record(record: logging.LogRecord) -> tuple[str, dict[str, Any]] | None:
    """``event`` and fields read from the format string and its arguments, so a value holding
    spaces or ``k=v`` text (a runner's output line) stays one field; None when the format is
    not ``event key=%x ...`` shaped."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple):
        return None
    event, *tokens = msg.split(" ")
    if not _EVENT.match(event):
        return None
    fields: dict[str, Any] = {}
    used = 0
    for token in tokens:
        key, sep, spec = token.partition("=")
        if not sep or not _KEY_NAME.match(key):
            return None
        count = len(_PLACEHOLDER.findall(spec))
        if used + count > len(args):
            return None
        if count == 0:
            fields[key] = _value(spec.replace("%%", "%"))
        elif count == 1 and _PLACEHOLDER.fullmatch(spec):
            fields[key] = _typed(args[used], spec)
        else:  # placeholders amid text: the value as the text line shows it
            fields[key] = _value(spec % args[used : used + count])
        used += count
    return (event, fields) if used == len(args) else None


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
        parsed = fields_from_record(record) or parse_event(message)
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
