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
    "ConfigError",
    "error_from_wire",
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


class ConfigError(BrokerError, ValueError):
    """A pipeline file is invalid; the message names the file, the key path and what was expected."""


_BY_NAME = {cls.__name__: cls for cls in (
    BrokerError, BrokerTimeout, BrokerGone, ArenaFull, ItemTooLarge, StaleHandle,
    UnknownName, BadRequest, UnsupportedArray, StageFailed, ConfigError)}


def error_from_wire(code: str, message: str) -> BrokerError:
    """Rebuild the exception the broker reported (unknown codes become ``BrokerError``)."""
    return _BY_NAME.get(code, BrokerError)(message)
