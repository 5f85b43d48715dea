"""Structured logging: one JSON object per line on stderr.

Call sites pass fields with ``extra={"fields": {...}}``. Nothing secret is ever passed here: the
admission path logs uids, namespaces, names and decisions, never request bodies or credentials.

Every rewrite is logged at info, so under load the server writes thousands of lines a second.
``JsonLineHandler`` therefore does not flush (one ``write(2)`` each) per line: lines below
WARNING written while the event loop runs leave together at most ``FLUSH_DELAY`` later; warnings,
errors and lines written with no loop running in the thread leave at once, and the buffer is
flushed at exit. Measured in bench/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
import time
from typing import IO, Any

import orjson

LOGGER_NAME = "mirrorgate"
# Longest an info line waits in the buffer. A crash (SIGKILL) loses at most this much.
FLUSH_DELAY = 0.02
_BUFFER_BYTES = 64 * 1024


def _line(
    created: float, level: str, logger: str, msg: str, fields: Any, error: str | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "ts": f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z",
        "level": level,
        "logger": logger,
        "msg": msg,
    }
    if isinstance(fields, dict):
        for key, value in fields.items():
            doc.setdefault(key, value)
    if error:
        doc["error"] = error
    return orjson.dumps(doc, default=str)


@functools.lru_cache(maxsize=4)
def _second(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return self.format_bytes(record).decode()

    def format_bytes(self, record: logging.LogRecord) -> bytes:
        error = self.formatException(record.exc_info) if record.exc_info else None
        return _line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "fields", None),
            error,
        )


class JsonLineHandler(logging.Handler):
    """JSON lines on a binary stream, flushed per batch rather than per line (module docs)."""

    def __init__(self, stream: IO[bytes], *, flush_delay: float = FLUSH_DELAY) -> None:
        super().__init__()
        self.stream = stream
        self.flush_delay = flush_delay
        self._json = JsonFormatter()
        # The loop whose timer will flush what is buffered, and its thread; None when nothing is.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_thread = 0
        # logging.Handler.__init__ made self.lock (typed Optional); the writes below hold it.
        self._guard = self.lock or threading.RLock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self._json.format_bytes(record), record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_fields(self, level: int, logger: str, msg: str, fields: dict[str, Any]) -> None:
        """The line ``emit`` writes for such a record, without building one (``log_fields``)."""
        line = _line(time.time(), _level_name(level), logger, msg, fields)
        with self._guard:
            self._write(line, level)

    def _write(self, line: bytes, level: int) -> None:
        self.stream.write(line + b"\n")
        if level >= logging.WARNING:
            self.flush()
            return
        pending = self._flush_loop
        # On the thread of the loop whose timer is pending, while that loop runs, the timer
        # takes this line too. Checked first: asyncio.get_running_loop() costs a getpid(2).
        if (
            pending is not None
            and self._flush_thread == threading.get_ident()
            and pending.is_running()
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        # Nothing pending, or a timer of a loop that stopped before it fired: schedule on this one.
        self._flush_loop = loop
        self._flush_thread = threading.get_ident()
        loop.call_later(self.flush_delay, self.flush)

    def flush(self) -> None:
        with self._guard:
            self._flush_loop = None
            # stderr closed or gone: nothing left to tell.
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()


_installed: JsonLineHandler | None = None


@functools.lru_cache(maxsize=64)
def _level_name(level: int) -> str:
    return logging.getLevelName(level).lower()


def log_fields(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """``logger.log(level, msg, extra={"fields": fields})``, for lines written per admission.

    When the process logs through ``setup_logging``'s handler alone (no other handler or filter
    on the way), the line is written without a LogRecord: the record machinery cost more than
    the rest of a small pod's admission (bench/README.md). Otherwise, e.g. under pytest's log
    capture, it takes the normal path. Both give the same line.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _direct_handler(logger, level)
    if handler is None:
        logger.log(level, msg, extra={"fields": fields})
    else:
        handler.write_fields(level, logger.name, msg, fields)


def _direct_handler(logger: logging.Logger, level: int) -> JsonLineHandler | None:
    handler = _installed
    if handler is None or level < handler.level or handler.filters:
        return None
    node: logging.Logger = logger
    while node is not logging.root:
        if node.handlers or node.filters or not node.propagate or node.parent is None:
            return None
        node = node.parent
    root = logging.root
    if root.filters or len(root.handlers) != 1 or root.handlers[0] is not handler:
        return None
    return handler


def _stderr_bytes() -> IO[bytes] | None:
    """A buffered binary writer on the process's stderr, or None when stderr is no real file
    (e.g. replaced by a test's capture)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return open(fd, "wb", buffering=_BUFFER_BYTES, closefd=False)  # noqa: SIM115


def setup_logging(level: str = "info") -> None:
    # The JSON lines carry none of these record attributes; not collecting them makes each line
    # cheaper (the logging HOWTO's "Optimization" section; the admission path logs every rewrite).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup: no sys._getframe walk per record
    global _installed
    stream = _stderr_bytes()
    handler: logging.Handler
    _installed = None
    if stream is not None:
        sys.stderr.flush()  # what was printed before keeps its place
        handler = _installed = JsonLineHandler(stream)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for previous in root.handlers:
        previous.flush()  # a handler replaced here keeps none of its lines
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our per-admission line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
