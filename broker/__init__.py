"""shmbroker's store: NumPy arrays in one shared-memory arena, handles, the broker process and its clients.

``Pipeline`` (YAML pipelines), ``Skipped`` (its marker for a skipped item) and
``Interrupted`` (a run stopped by a signal) live in the layer above, ``shmbroker``; they are re-exported here lazily, so ``import broker``
never loads it.
"""

from .client import Client
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
    WorkerDied,
)
from .process import Broker
from .protocol import Handle

__version__ = "0.2.0"

__all__ = [
    "ArenaFull", "BadRequest", "Broker", "BrokerError", "BrokerGone", "BrokerTimeout", "Client",
    "ConfigError", "Handle", "Interrupted", "ItemTooLarge", "Pipeline", "Skipped", "StageFailed",
    "StaleHandle", "UnknownName", "UnsupportedArray", "WorkerDied",
]


def __getattr__(name: str) -> object:
    if name in ("Pipeline", "Skipped", "Interrupted"):  # the pipeline layer, imported on first use
        from shmbroker import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
