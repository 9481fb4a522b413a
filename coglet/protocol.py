"""The wire protocol between the pool (parent) and a coglet runner (child).

Defined once, here, and imported by both sides. Standard library only: this module runs
under the model's interpreter (CPython 3.9+).

A runner owns a private working directory. Every file the other side reads is written to a
temporary name in the same directory (``.tmp-*``, matching no pattern below) and then
``os.replace``d into place, so a reader never sees a half-written file. Signals carry no
payload: they only say "something changed, rescan".
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
import signal
from typing import Any, Callable, List, Optional, Sequence, Union

__all__ = [
    "CANCEL_PREFIX",
    "CONFIG_FILE",
    "DELTA_FILE_KEY",
    "DELTA_FILE_PREFIX",
    "ERROR_TYPE_KEY",
    "EXIT_BAD_CONFIG",
    "EXIT_OK",
    "EXIT_PARENT_DIED",
    "EXIT_RESPONSE_WRITE_FAILED",
    "EXIT_SETUP_FAILED",
    "FEATURE_HEALTHCHECK",
    "FEATURE_STREAMING",
    "FEATURE_TRAINING",
    "HEALTHCHECK_INTERVAL_S",
    "HEALTHCHECK_TIMEOUT_S",
    "HEALTH_FILE",
    "ID_PATTERN",
    "KIND_PREDICTION",
    "KIND_TRAINING",
    "LOG_FD_ENV",
    "OPENAPI_FILE",
    "PATH_MARKER",
    "RAW_OUTPUT_KEY",
    "REQUEST_FILE_KEY",
    "REQUEST_RE",
    "RESPONSE_RE",
    "SAFETY_RESCAN_S",
    "SETUP_RESULT_FILE",
    "SETUP_TIMEOUT_ENV",
    "SETUP_TIMEOUT_ERROR",
    "SIG_BUSY",
    "SIG_CANCEL",
    "SIG_OUTPUT",
    "SIG_READY",
    "SIG_RESCAN",
    "SPILL_DELTA_BYTES",
    "SPILL_DIR_PREFIX",
    "STATUS_CANCELED",
    "STATUS_FAILED",
    "STATUS_PROCESSING",
    "STATUS_STARTING",
    "STATUS_SUCCEEDED",
    "STOP_FILE",
    "TERMINAL_STATUSES",
    "TMP_PREFIX",
    "cancel_name",
    "delta_problem",
    "is_valid_id",
    "read_delta_file",
    "read_json",
    "read_json_file",
    "request_name",
    "response_name",
    "write_atomic",
    "write_json_atomic",
    "write_request",
]

# --- prediction ids --------------------------------------------------------------------------
# An id becomes part of a file name on the runner side, so this rule is a security boundary:
# no "..", no slash, no control character, bounded length.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(rf"^{ID_PATTERN}$")


def is_valid_id(prediction_id: object) -> bool:
    """True when ``prediction_id`` is a string that is safe to use in a protocol file name."""
    return isinstance(prediction_id, str) and _ID_RE.match(prediction_id) is not None


# --- files -------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"  # pool -> runner, before spawn
OPENAPI_FILE = "openapi.json"  # runner -> pool, before setup()
SETUP_RESULT_FILE = "setup_result.json"  # runner -> pool, after setup()
STOP_FILE = "stop"  # pool -> runner: finish or cancel work, flush, exit 0
# runner -> pool, after setup, only for a predictor with a healthcheck() method; rewritten
# after every check: {"healthy": bool, "error": str|null, "checked_at": iso}. The runner
# sends SIG_OUTPUT when the result (healthy, error) changes, never for a repeat.
HEALTH_FILE = "health.json"
TMP_PREFIX = ".tmp-"  # temporary names; match no pattern below

REQUEST_PREFIX = "request-"
CANCEL_PREFIX = "cancel-"
RESPONSE_PREFIX = "response-"

REQUEST_RE = re.compile(rf"^request-(?P<id>{ID_PATTERN})\.json$")
# The id may itself contain "-" and digits; the epoch is the digits after the last "-".
RESPONSE_RE = re.compile(rf"^response-(?P<id>{ID_PATTERN})-(?P<epoch>[0-9]+)\.json$")
CANCEL_RE = re.compile(rf"^cancel-(?P<id>{ID_PATTERN})$")


def request_name(prediction_id: str) -> str:
    """File name of one prediction request: ``{"id", "input", "context"?, "stream"}``."""
    return f"{REQUEST_PREFIX}{prediction_id}.json"


def write_request(
    working_dir: str, prediction_id: str, data: bytes, *, spill_dir: Optional[str] = None
) -> None:
    """Write one request's JSON ``data`` for the runner; a large one goes to ``spill_dir``
    (on disk) with a pointer in the working dir, whose size must not bound an input."""
    path = os.path.join(working_dir, request_name(prediction_id))
    if spill_dir is None or len(data) <= SPILL_DELTA_BYTES:
        write_atomic(path, data)
        return
    spilled = os.path.join(spill_dir, request_name(prediction_id))
    pointer = {"id": prediction_id, REQUEST_FILE_KEY: spilled}
    write_spilled(path, spilled, data, _encode_compact(pointer).encode())


def write_spilled(
    path: str, spilled: str, data: Union[bytes, Sequence[bytes]], pointer: bytes
) -> None:
    """Write a large ``data`` to ``spilled`` and the small ``pointer`` to it at ``path`` (both
    atomically); the spilled file is removed again when the pointer cannot be written, so
    nothing is left that no reader will ever find."""
    write_atomic(spilled, data)
    try:
        write_atomic(path, pointer)
    except BaseException:
        try:
            os.unlink(spilled)
        except OSError:
            pass
        raise


def cancel_name(prediction_id: str) -> str:
    """File name (empty file) that asks the runner to cancel one prediction."""
    return f"{CANCEL_PREFIX}{prediction_id}"


def response_name(prediction_id: str, epoch: int) -> str:
    """File name of update number ``epoch`` (0, 1, 2, ...) of one prediction."""
    return f"{RESPONSE_PREFIX}{prediction_id}-{epoch}.json"


# Response files are *deltas*, applied strictly in epoch order by the reader:
#   "status":        one of the status words below (always present)
#   "output_append": list of items to append to the output list (iterators, streamed)
#   "output":        the whole output (non-iterator predictors), set once
#   "logs_append":   text to append to the prediction's logs
#   "metrics":       dict merged into the prediction's metrics
#   "error":         error message (with status "failed")
# Epoch 0 carries status "processing" and marks the start. The last epoch carries a terminal
# status. A runner-side output ``Path`` is encoded as {PATH_MARKER: "/absolute/path"}; the pool
# turns it into a data: URI or an uploaded URL.
PATH_MARKER = "__cog_path__"
# A file *object* a model returns is copied by the runner into a fresh directory named with
# this prefix, inside the runner's private temporary root (config.json "temp_dir", made by the
# pool for this runner alone); the pool removes that directory once the file is encoded or
# uploaded (a large one is first moved out, into the prediction's own kept files). The pool
# removes nothing outside that root: Paths the model returns are its own
# files and are left alone, whatever their directory is called.
SPILL_DIR_PREFIX = "cog-output-"
# A delta whose JSON text is larger than this is not written into the working directory (a
# tmpfs, whose size must not bound an output): the runner writes it to
# ``<temp_dir>/delta-<id>-<epoch>.json`` on disk and the response file carries only
# ``{"status": ..., DELTA_FILE_KEY: "<that path>"}``. The pool reads the delta from there
# (off its event loop), then removes the file.
SPILL_DELTA_BYTES = 1024 * 1024
DELTA_FILE_KEY = "delta_file"
DELTA_FILE_PREFIX = "delta-"
# A spilled delta whose whole output is one large string carries it raw: the file is the
# delta's JSON (with RAW_OUTPUT_KEY: true, without "output"), a newline (compact JSON has
# none), then the string as UTF-8. The reader decodes it in slices: one C call over a huge
# string (json.loads, bytes.decode) holds the GIL, and would stall the pool's event loop
# even from a worker thread.
RAW_OUTPUT_KEY = "output_raw"
# Requests likewise: a request over SPILL_DELTA_BYTES (a long text input) is written by the
# pool to ``<temp_dir>/request-<id>.json`` and the request file carries only
# ``{"id": ..., REQUEST_FILE_KEY: "<that path>"}``; the runner reads it there and removes it.
REQUEST_FILE_KEY = "request_file"
# A terminal "failed" delta may name the exception's type (e.g. "MemoryError"): the pool
# recycles a runner whose predictions fail for lack of memory.
ERROR_TYPE_KEY = "error_type"
# The runner's own log lines (coglet's, never the model's) go to this inherited file
# descriptor when the variable names one, so the pool can keep them out of predictions' logs;
# the runner's stdout/stderr carry only what the model and its children write.
LOG_FD_ENV = "COGLET_LOG_FD"

# --- config.json and setup_result.json keys beyond the basics ---------------------------------
# config.json (pool -> runner):
#   "train_ref":               cog.yaml's train: ("train.py:train"); absent: no trainings
#   "healthcheck_interval_s":  seconds between user healthcheck() runs (default below)
# setup_result.json (runner -> pool) carries, once setup succeeded:
#   "features": {FEATURE_STREAMING: bool, FEATURE_TRAINING: bool, FEATURE_HEALTHCHECK: bool}
#   "training_error": why train_ref could not be used (trainings disabled, predictions run)
FEATURE_STREAMING = "streaming"  # predict() has @cog.streaming: the pool may answer SSE
FEATURE_TRAINING = "training"  # a train_ref loaded: requests of kind "training" run train()
FEATURE_HEALTHCHECK = "healthcheck"  # the predictor has healthcheck(): health.json is kept
HEALTHCHECK_INTERVAL_S = 5.0
# A check that takes longer than this counts as failed (Cog's limit).
HEALTHCHECK_TIMEOUT_S = 5.0

# A request file's "kind" (default KIND_PREDICTION); the response deltas are the same.
KIND_PREDICTION = "prediction"
KIND_TRAINING = "training"

# Seconds the runner allows import + setup(), from its environment (Cog's variable; the pool
# also passes cog.yaml's environment:). Past it, setup fails with Cog's error text.
SETUP_TIMEOUT_ENV = "COG_SETUP_TIMEOUT"
SETUP_TIMEOUT_ERROR = "worker setup timed out"

# --- status words ------------------------------------------------------------------------------
STATUS_STARTING = "starting"
STATUS_PROCESSING = "processing"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
STATUS_CANCELED = "canceled"
TERMINAL_STATUSES = frozenset({STATUS_SUCCEEDED, STATUS_FAILED, STATUS_CANCELED})
STATUSES = frozenset({STATUS_STARTING, STATUS_PROCESSING}) | TERMINAL_STATUSES


def delta_problem(delta: Any) -> Optional[str]:
    """Why ``delta`` is not a well-formed response update (see the list above), or None.

    The reader checks every delta before applying it: a runner that writes garbage fails
    its prediction with this message instead of breaking the reader.
    """
    if not isinstance(delta, dict):
        return f"not a JSON object but {type(delta).__name__}"
    status = delta.get("status")
    if status is not None and (not isinstance(status, str) or status not in STATUSES):
        return f"unknown status {status!r:.80}"
    kinds = (
        ("output_append", list, "a list"),
        ("logs_append", str, "a string"),
        ("metrics", dict, "an object"),
    )
    for key, kind, words in kinds:
        if key in delta and not isinstance(delta[key], kind):
            return f"{key} is not {words}"
    return None


# --- signals -----------------------------------------------------------------------------------
# runner -> pool
SIG_READY = signal.SIGUSR1  # a slot is free (a hint; admission uses the pool's own accounting)
SIG_BUSY = signal.SIGUSR2  # all slots taken (a hint)
SIG_OUTPUT = signal.SIGHUP  # new response files: rescan
# pool -> runner
SIG_RESCAN = signal.SIGHUP  # new request/cancel/stop files: rescan (only after setup_result)
SIG_CANCEL = signal.SIGUSR1  # a cancel-<id> file was written: cancel (sync: raise in predict)

# Both sides rescan at least this often, so a coalesced or lost signal costs at most this long.
SAFETY_RESCAN_S = 1.0

# --- runner exit codes -------------------------------------------------------------------------
EXIT_OK = 0  # stopped on request
EXIT_BAD_CONFIG = 2  # config.json missing or malformed: a pool bug, do not restart-loop
EXIT_SETUP_FAILED = 3  # the model's definition or setup() failed: do not restart-loop
EXIT_PARENT_DIED = 4  # the pool went away; the runner left on its own
# A response file could not be written even as a short failure notice: the runner exits so
# that the pool fails its predictions and starts a fresh one, instead of waiting forever.
EXIT_RESPONSE_WRITE_FAILED = 5


# --- atomic files ------------------------------------------------------------------------------
# next() on itertools.count is atomic under the GIL, so threads never share a name.
_tmp_counter = itertools.count()


def write_atomic(path: str, data: Union[bytes, Sequence[bytes]]) -> None:
    """Write ``data`` (bytes, or a sequence of bytes written one after another, which spares
    joining a large output into one more copy) to ``path`` so that a reader sees either
    nothing or all of it.

    The temporary file lives in the same directory: ``os.replace`` is atomic only within
    one filesystem. Its name is unique to this process and call (pid + counter), which costs
    three syscalls where ``tempfile.mkstemp``'s random names cost about three times as much
    time; a stale name left by a dead process with a reused pid is simply truncated.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{next(_tmp_counter)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            for chunk in (data,) if isinstance(data, (bytes, bytearray)) else data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Built once: json.dumps() with any non-default option builds a new encoder on every call.
_encode_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def write_json_atomic(path: str, obj: Any) -> None:
    """Serialise ``obj`` as compact JSON and write it atomically to ``path``."""
    write_atomic(path, _encode_compact(obj).encode())


def read_json(path: str) -> Optional[Any]:
    """Read a JSON protocol file; None when it does not exist (yet, or any more).

    Raises ValueError (JSONDecodeError, UnicodeDecodeError...) when it is not JSON.

    Plain ``os`` calls (open, read, close) rather than ``open()``'s buffered file object,
    which adds an fstat and a second read: half the time, on both sides of every round trip.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) == _READ_CHUNK:  # a regular file reads short only at its end
            return _loads_once(_read_rest(fd, data))
    finally:
        os.close(fd)
    return _loads(data)


def read_json_file(path: str) -> Any:
    """Read a possibly large JSON file (a spilled delta); FileNotFoundError if it is gone.

    At most twice the file's size is alive at once: the bytes, then the text, then the value.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = _read_rest(fd, b"")
    finally:
        os.close(fd)
    return _loads_once(data)


def read_delta_file(path: str, *, text: Callable[[List[str]], Any] = "".join) -> Any:
    """Read a spilled delta (either form: JSON, or JSON head + raw string output).

    The JSON form holds at most twice the file's size at once. The raw form is read and
    decoded a slice at a time: the output's slices, plus one slice, are all it holds; no
    single C call runs over the whole output. ``text(slices)`` makes the output's value from
    its decoded slices (the default joins them: one more whole copy, for a moment)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: List[bytes] = []
        while True:
            chunk = os.read(fd, _DECODE_SLICE)
            if not chunk:  # no newline: the whole file is one JSON text
                data = b"".join(chunks)
                chunks.clear()
                json_text = data.decode("utf-8", "surrogatepass")
                del data  # gone before the parse: at most two copies at once
                return _loads(json_text)
            newline = chunk.find(b"\n")
            if newline < 0:
                chunks.append(chunk)
                continue
            chunks.append(chunk[:newline])
            head = _loads(b"".join(chunks).decode("utf-8"))
            if not isinstance(head, dict) or head.pop(RAW_OUTPUT_KEY, None) is not True:
                raise ValueError(
                    f"{os.path.basename(path)}: a raw output without {RAW_OUTPUT_KEY!r}"
                )
            head["output"] = text(_decode_rest(fd, chunk[newline + 1 :]))
            return head
    finally:
        os.close(fd)


_DECODE_SLICE = 1 << 20


def _decode_rest(fd: int, first: bytes) -> List[str]:
    """``first`` and the rest of the file as UTF-8 text, read and decoded a slice at a time
    (the GIL is free between slices)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    slices = [decoder.decode(first)]
    while True:
        chunk = os.read(fd, _DECODE_SLICE)
        if not chunk:
            break
        slices.append(decoder.decode(chunk))
    slices.append(decoder.decode(b"", final=True))
    return [piece for piece in slices if piece]


def _read_rest(fd: int, head: bytes) -> bytearray:
    """``head`` plus the rest of the file, read into one buffer of the file's size."""
    size = max(os.fstat(fd).st_size, len(head))
    buf = bytearray(size)
    buf[: len(head)] = head
    view = memoryview(buf)
    filled = len(head)
    while True:
        if filled == len(buf):  # the file grew (it should not): read on in chunks
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            view.release()
            buf.extend(chunk)
            view = memoryview(buf)
            filled = len(buf)
            continue
        n = os.readv(fd, [view[filled:]])
        if n == 0:
            break
        filled += n
    view.release()
    del buf[filled:]
    return buf


def _loads_once(data: bytearray) -> Any:
    # json.loads(bytes) decodes to a str and keeps the bytes alive meanwhile, then parses: three
    # copies of a large output at once. Decoding here lets the bytes go before the parse.
    text = data.decode("utf-8", "surrogatepass")
    data.clear()
    return _loads(text)


def _loads(data: Any) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        # Readers handle ValueError (malformed); nesting past the interpreter's recursion
        # limit is malformed too, and must not escape as a different exception.
        raise ValueError("JSON nested too deeply to read") from None


_READ_CHUNK = 1 << 16
