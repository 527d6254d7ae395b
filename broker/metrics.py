"""Prometheus metrics for a broker (prometheus-client), served from a snapshot the event loop refreshes."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["BrokerCollector", "serve_metrics"]


class BrokerCollector(Collector):
    """Reads the last stats snapshot; the HTTP thread never touches the loop's live state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {}

    def update(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self._stats = stats

    def collect(self) -> Iterator[Any]:
        with self._lock:
            st = self._stats
        if not st:
            return
        for name, key, doc in (("arena_capacity_bytes", "capacity", "arena size"),
                               ("arena_used_bytes", "used", "bytes allocated in the arena"),
                               ("arena_peak_bytes", "peak", "highest arena use since start"),
                               ("objects", "objects", "live arrays in the arena"),
                               ("clients", "clients", "connected clients"),
                               ("inflight_items", "inflight_items", "items between source and sink")):
            yield GaugeMetricFamily(f"shmbroker_{name}", doc, value=st[key])
        items = CounterMetricFamily("shmbroker_stage_items", "items a stage finished", labels=["stage"])
        failed = CounterMetricFamily("shmbroker_stage_errors", "items a stage failed on", labels=["stage"])
        queue = GaugeMetricFamily("shmbroker_stage_queue_depth", "tasks waiting", labels=["stage"])
        workers = GaugeMetricFamily("shmbroker_stage_workers", "workers attached", labels=["stage"])
        for s in st["stages"]:
            items.add_metric([s["name"]], s["done"])
            failed.add_metric([s["name"]], s["failed"])
            queue.add_metric([s["name"]], s["queue"])
            workers.add_metric([s["name"]], len(s["workers"]))
        yield from (items, failed, queue, workers)
        counters = st.get("counters", {})
        yield CounterMetricFamily("shmbroker_workers_lost", "workers whose process died",
                                  value=counters.get("workers_lost", 0))
        yield CounterMetricFamily("shmbroker_tasks_requeued", "tasks re-queued after a worker died",
                                  value=counters.get("requeued", 0))
        yield CounterMetricFamily("shmbroker_bad_messages", "malformed messages refused",
                                  value=counters.get("bad_messages", 0))


def serve_metrics(port: int, addr: str = "127.0.0.1") -> tuple[BrokerCollector, Callable[[], None]]:
    """Start the HTTP endpoint on ``addr:port``; returns the collector and a stop function."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    collector = BrokerCollector()
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return collector, stop
