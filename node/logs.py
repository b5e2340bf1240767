"""Logging for the daemon: structlog on top of stdlib logging, JSON lines unless on a terminal.

Library loggers (py-libp2p, asyncio) go through the same handler, so one stream carries all.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "console", "json")

# Chatty at INFO and below (py-libp2p warns on every failed DHT read); kept at WARNING
# unless the node itself logs at debug.
NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "zeroconf", "asyncio", "trio")

# Applied to structlog events and to stdlib records alike, so both render the same keys.
_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


class _NodeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs on the root logger (and replaces on reconfigure)."""


def configure_logging(level: str, fmt: str, stream: TextIO = sys.stderr) -> None:
    """Route structlog and stdlib logging to ``stream`` at ``level`` as "console", "json" or "auto"."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    console = fmt == "console" or (fmt == "auto" and _is_tty(stream))

    renderer: structlog.typing.Processor
    if console:
        # NO_COLOR is the common convention for turning terminal colours off (no-color.org).
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(stream) and not os.environ.get("NO_COLOR"))
        exception_processors: list[structlog.typing.Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exception_processors = [structlog.processors.format_exc_info]

    handler = _NodeHandler(stream)
    if level != "debug":
        handler.addFilter(_quiet_libraries)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exception_processors,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _NodeHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[level])

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    _adopt_libp2p_logger()

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers may be created before this runs; caching would freeze them
        # on structlog's default configuration.
        cache_logger_on_first_use=False,
    )


class Repeats:
    """Holds back a fault's log record while the same fault repeats, for ``interval_s``.

    A full disk fails every head verification and every round, once a second or more, with
    the same error. The first record of a fault goes out; the same fault (the same ``key``)
    again within ``interval_s`` is only counted, and the next record out says how many were
    held back (``repeated``). Counters on the status port still count every one.
    """

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def due(self, key: str) -> int | None:
        """None: hold this one back. Otherwise log it, with this many held back since the last."""
        now = self._clock()
        # Faults that stopped are forgotten, so the map stays small: at once when nothing was
        # held back since they were logged, after ten intervals otherwise.
        for old, (when, held) in list(self._last.items()):
            if old != key and now - when >= (10 * self.interval_s if held else self.interval_s):
                del self._last[old]
        when, held = self._last.get(key, (float("-inf"), 0))
        if now - when < self.interval_s:
            self._last[key] = (when, held + 1)
            return None
        self._last[key] = (now, 0)
        return held


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger named ``name`` (use the module's ``__name__``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


# py-libp2p sets levels on some of its own child loggers (so the parent's WARNING does not
# reach them) and warns on every empty DHT read; both are noise for an operator.
_DHT_NOISE = "Failed to read DHT message"


def _quiet_libraries(record: logging.LogRecord) -> bool:
    if not record.name.startswith(NOISY_LOGGERS):
        return True
    if record.levelno < logging.WARNING:
        return False
    return not (record.name.startswith("libp2p.kad_dht") and str(record.msg).startswith(_DHT_NOISE))


def _adopt_libp2p_logger() -> None:
    # Importing libp2p detaches its logger (no handlers, propagate=False), which sends its
    # warnings to Python's bare last-resort handler. Reattach it to ours, unless the user
    # asked for libp2p's own debug logging with LIBP2P_DEBUG. The daemon imports the
    # libp2p bridge before configuring logging, so this sees the detached logger.
    if os.environ.get("LIBP2P_DEBUG"):
        return
    libp2p = logging.getLogger("libp2p")
    libp2p.handlers.clear()
    libp2p.propagate = True


def _is_tty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
