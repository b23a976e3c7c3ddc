"""Logs: structlog events, handed to the standard logging module as readable records.

The library only emits records on the ``sshjobs`` loggers; the user's application (or the
CLI, through ``configure``) decides where they go and how they look.  Each event becomes one
stdlib record whose message is one readable line (``host node03 failed: ConnectionRefused:
...``), so ``logging.basicConfig()``, or no configuration at all, shows that line; its
fields ride along as record attributes (``record.event == "host failed"``,
``record.host``, ``record.error``...), for a JSON formatter or structlog's
``ProcessorFormatter`` with ``structlog.stdlib.ExtraAdder()``.  A field whose name a
LogRecord already uses (``message``, ``name``...) is given a trailing underscore there.
structlog is imported at the first record, not before: a command that logs nothing (one
through a session) does not pay for it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# Names a LogRecord has already; `extra` may not set them.
_RECORD_NAMES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# Fields that read as the event's reason, in this order, after the event: "event: ERROR: DETAIL".
_REASON = ("error", "detail", "message")


def message(event: str, fields: dict[str, Any]) -> str:
    """One readable line for an event and its fields."""
    host = fields.get("host")
    if host is None:
        line = event
    elif event.startswith("host "):
        line = f"host {host} {event[5:]}"  # "host failed" -> "host node03 failed"
    else:
        line = f"{host}: {event}"
    rest = {k: v for k, v in fields.items() if k != "host" and v is not None}
    for key in _REASON:
        if key in rest:
            line += f": {rest.pop(key)}"
    if rest:
        line += " (" + ", ".join(f"{k}={_value(v)}" for k, v in rest.items()) + ")"
    return " ".join(part.strip() for part in line.splitlines() if part.strip())


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return repr(value)


def to_stdlib(_logger, _method: str, event_dict: dict) -> tuple[tuple, dict]:
    """structlog's last step: the stdlib call, with the readable line as its message and the
    event and its fields as the record's attributes."""
    fields = dict(event_dict)
    event = str(fields.pop("event", ""))
    exc_info = fields.pop("exc_info", None)
    extra = {"event": event}
    extra.update({f"{k}_" if k in _RECORD_NAMES else k: v for k, v in fields.items()})
    kwargs: dict[str, Any] = {"extra": extra}
    if exc_info:
        kwargs["exc_info"] = exc_info
    # the line goes as an argument, so a % in a field is never read as a format
    return ("%s", message(event, fields)), kwargs


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL}


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


class _Logger:
    """A structlog logger, made at its first use."""

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str):
        self._name = name
        self._logger = None

    def __getattr__(self, method: str):
        if self._logger is None:
            level = _LEVELS.get(method)
            if level is not None and not logging.getLogger(self._name).isEnabledFor(level):
                return _nothing  # a record nobody would see: structlog is not needed yet
            import structlog

            self._logger = structlog.wrap_logger(
                logging.getLogger(self._name),
                processors=[structlog.stdlib.filter_by_level, to_stdlib],
                wrapper_class=structlog.stdlib.BoundLogger,
                cache_logger_on_first_use=True,
            )
        return getattr(self._logger, method)


def get_logger(name: str):
    return _Logger(name)


def _own_names(_logger, _method: str, event_dict: dict) -> dict:
    """Back from record attributes (structlog's ExtraAdder) to the fields' own names."""
    for key in [k for k in event_dict if k.endswith("_") and k[:-1] in _RECORD_NAMES]:
        event_dict[key[:-1]] = event_dict.pop(key)
    return event_dict


def configure(level: int = logging.WARNING, fmt: str = "human", stream=None) -> None:
    """Send sshjobs' logs to stderr (or ``stream``), human-readable (``human``, structlog's
    console renderer) or one JSON object a line (``json``: ``event``, its fields, ``level``,
    ``logger``, ``timestamp``), at ``level`` and above.  They no longer reach the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt, (stream or sys.stderr).isatty()))
    root = logging.getLogger("sshjobs")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class _Formatter(logging.Formatter):
    """structlog's ProcessorFormatter, made at the first record."""

    def __init__(self, fmt: str, colors: bool):
        super().__init__()
        self._fmt_name, self._colors, self._made = fmt, colors, None

    def format(self, record: logging.LogRecord) -> str:
        if self._made is None:
            import structlog

            renderer = (structlog.processors.JSONRenderer() if self._fmt_name == "json"
                        else structlog.dev.ConsoleRenderer(colors=self._colors))
            pre_chain = [structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                         structlog.processors.TimeStamper(fmt="iso", utc=True)]
            self._made = structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
                foreign_pre_chain=[structlog.stdlib.ExtraAdder(), _own_names, *pre_chain])
        return self._made.format(record)
