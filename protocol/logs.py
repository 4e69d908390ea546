"""structlog set-up shared by both daemons and the CLI: console on a TTY, JSON lines otherwise.

Everything a process writes goes through the same renderer: structlog's own events, and the stdlib
`logging` records of libraries (uvicorn, asyncio's "Task was destroyed..." and "exception was never
retrieved"), `warnings`, and uncaught exceptions. So under `--log-format json` every line is JSON.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
from types import TracebackType
from typing import TextIO

import structlog


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"


_log = structlog.get_logger("exo")


def configure_logging(
    fmt: LogFormat = LogFormat.AUTO, level: str = "info", stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stderr
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and out.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, renderer, numeric_level, json=not use_console)


def _route_stdlib(out: TextIO, renderer: structlog.types.Processor, level: int, json: bool) -> None:
    """Send stdlib logging, warnings and uncaught exceptions through the structlog renderer."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # JSON needs the traceback as a string field; the console renderer formats it itself.
            *([structlog.processors.format_exc_info] if json else []),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn and asyncio log through their own named loggers: let them reach the root handler only.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _log.critical("uncaught_exception", error=repr(exc), exc_info=(exc_type, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    _log.critical(
        "uncaught_thread_exception",
        thread=args.thread.name if args.thread else None,
        error=repr(args.exc_value),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
