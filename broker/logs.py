"""Logging setup: process and role names in every line, plain or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by pytest)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname, "logger": record.name, "role": getattr(record, "role", ""),
               "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "WARNING", as_json: bool = False, role: str = "main") -> None:
    """Configure the root logger once per process; ``role`` (``broker``, ``worker:NAME``) tags lines."""
    old = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = old(*args, **kwargs)
        record.role = role
        return record

    logging.setLogRecordFactory(factory)
    handler = _StderrHandler()
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
