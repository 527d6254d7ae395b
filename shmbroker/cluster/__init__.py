"""Running a pipeline on a Ray cluster: one broker per node, Ray between nodes (``docs/cluster.md``).

Nothing here is imported, and Ray never is, unless a config has a
``cluster:`` block. ``plan.py`` decides which node runs what (pure);
``agent.py`` is the node agent and the worker actor; ``driver.py`` is
``ClusterPipeline``, the driver of a cluster run; ``status.py`` what
``shmbroker status`` and ``doctor`` show of a cluster.
"""

from __future__ import annotations

from types import ModuleType

from broker.errors import ConfigError

__all__ = ["import_ray", "RAY_MISSING"]

RAY_MISSING = ("cluster: engine ray needs Ray, which is not installed in this Python ({why}); install "
               "it with: pip install 'shmbroker[ray]' (here and on every node of the cluster, the same "
               "Ray version everywhere), or remove the cluster: block to run on this host")


def import_ray() -> ModuleType:
    """``ray``, or ``ConfigError`` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(RAY_MISSING.format(why=f"{type(e).__name__}: {e}")) from None
    return ray
