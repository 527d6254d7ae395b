"""The error hierarchy: one base class, a subclass per failure, each raised where its docstring says."""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerTimeout",
    "BrokerGone",
    "ArenaFull",
    "ItemTooLarge",
    "StaleHandle",
    "UnknownName",
    "BadRequest",
    "UnsupportedArray",
    "StageFailed",
    "WorkerDied",
    "ConfigError",
    "error_from_wire",
    "format_bytes",
]


class BrokerError(Exception):
    """Base of every error this project raises on purpose."""


class BrokerTimeout(BrokerError, TimeoutError):
    """The broker did not answer, or a wait (lookup, arena space) ran past its timeout."""


class BrokerGone(BrokerError, ConnectionError):
    """The broker process exited or closed this client's connection."""


class ArenaFull(BrokerError, MemoryError):
    """No room in the arena before the timeout: consumers are not releasing fast enough."""


class ItemTooLarge(BrokerError, ValueError):
    """An array is larger than the whole arena; it can never fit."""


class StaleHandle(BrokerError, KeyError):
    """A handle names a block that was released or reused, or another broker's block."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownName(BrokerError, LookupError):
    """No handle is published under that name (``lookup`` timed out)."""


class BadRequest(BrokerError, ValueError):
    """The broker refused a malformed request; the message says which field."""


class UnsupportedArray(BrokerError, TypeError):
    """An array that cannot live in the arena or become a tensor (object or structured dtype)."""


class StageFailed(BrokerError, RuntimeError):
    """A stage function raised; the message names the stage, the item and the worker's traceback."""


class WorkerDied(StageFailed):
    """The workers given an item died more often than its stage's ``retries`` allow; the message
    names the worker, its pid and its exit code where the process that started it knows it."""


class ConfigError(BrokerError, ValueError):
    """A pipeline file is invalid; the message names the file, the key path and what was expected."""


_BY_NAME = {cls.__name__: cls for cls in (
    BrokerError, BrokerTimeout, BrokerGone, ArenaFull, ItemTooLarge, StaleHandle,
    UnknownName, BadRequest, UnsupportedArray, StageFailed, WorkerDied, ConfigError)}


def error_from_wire(code: str, message: str) -> BrokerError:
    """Rebuild the exception the broker reported (unknown codes become ``BrokerError``)."""
    return _BY_NAME.get(code, BrokerError)(message)


def format_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``: sizes in messages users read."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
