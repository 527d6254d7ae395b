"""shmbroker: NumPy arrays in shared memory, handles over ZeroMQ, zero-copy torch tensors in workers."""

from .client import Broker, Client
from .errors import (
    ArenaFull,
    BadRequest,
    BrokerError,
    BrokerGone,
    BrokerTimeout,
    ConfigError,
    ItemTooLarge,
    StageFailed,
    StaleHandle,
    UnknownName,
    UnsupportedArray,
)
from .protocol import Handle

__version__ = "0.1.0"

__all__ = [
    "ArenaFull",
    "BadRequest",
    "Broker",
    "BrokerError",
    "BrokerGone",
    "BrokerTimeout",
    "Client",
    "ConfigError",
    "Handle",
    "ItemTooLarge",
    "Pipeline",
    "StageFailed",
    "StaleHandle",
    "UnknownName",
    "UnsupportedArray",
]


def __getattr__(name: str):  # Pipeline imports torch-free config and launcher lazily
    if name == "Pipeline":
        from .launcher import Pipeline

        return Pipeline
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
