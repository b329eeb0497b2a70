"""The Prometheus metrics of one app (``GET /metrics``): requests, latency, batch sizes and waits,
queue depth, gallery size."""

from __future__ import annotations

from typing import Any

__all__ = ["Metrics"]


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process stay apart)."""

    def __init__(self, batchers: dict[str, Any], kinds: tuple[str, ...], gallery_size: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series (a timestamp per label set): smaller scrapes

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "asymvlm_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "asymvlm_request_duration_seconds", "Request latency by route", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )  # fmt: skip
        self.batch = Histogram(
            "asymvlm_batch_size", "Queries per model call, by kind", ["kind"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )  # fmt: skip
        self.wait = Histogram(
            "asymvlm_batch_wait_seconds", "How long the first request of a batch waited, by kind", ["kind"],
            registry=self.registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )  # fmt: skip
        queue = Gauge(
            "asymvlm_queue_depth", "Queries waiting for a model call, by kind", ["kind"], registry=self.registry
        )
        for kind in kinds:  # the batchers of the running app (none before start-up)
            queue.labels(kind).set_function(lambda kind=kind: batchers[kind].queued if kind in batchers else 0)
        Gauge("asymvlm_gallery_images", "Images in the served gallery", registry=self.registry).set(gallery_size)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def on_batch(self, kind: str):
        def observe(units: int, waited: float) -> None:
            self.batch.labels(kind).observe(units)
            self.wait.labels(kind).observe(waited)

        return observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
