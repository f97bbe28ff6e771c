"""Process-wide metrics, rendered in the Prometheus text format (0.0.4) at ``/metrics``.

Dependency-free on purpose: one process serves one replica (no multiprocess collection to
need ``prometheus_client`` for), counters, gauges and one histogram are all the server
needs, and the text format is a few lines. Every instrument is thread-safe: sync routes and
streamed bodies run in the thread pool.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Labels, extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values!r}")
        return tuple(values)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count; ``inc(*label_values, amount=1)``."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(label_values)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]  # an unlabelled counter exists from the start
        lines = self._header()
        for key, value in items:
            lines.append(f"{self.name}{_labels(self.label_names, key)} {_number(value)}")
        return lines


class Gauge(_Metric):
    """A value that goes up and down (unlabelled: in-flight work)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    @property
    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return [*self._header(), f"{self.name} {_number(self.value)}"]


@dataclass
class _Series:
    buckets: list[int]  # observations per bucket (not cumulative)
    total: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help_text, labels)
        self.bounds = tuple(sorted(buckets))
        self._series: dict[Labels, _Series] = {}

    def observe(self, value: float, *label_values: str) -> None:
        key = self._key(label_values)
        slot = bisect.bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            series = self._series.setdefault(key, _Series([0] * len(self.bounds)))
            if slot < len(self.bounds):
                series.buckets[slot] += 1
            series.total += value
            series.count += 1

    def render(self) -> list[str]:
        with self._lock:
            snapshot = {
                k: _Series(list(s.buckets), s.total, s.count) for k, s in self._series.items()
            }
        lines = self._header()
        for key, series in sorted(snapshot.items()):
            cumulative = 0
            for bound, n in zip(self.bounds, series.buckets, strict=True):
                cumulative += n
                le = _labels(self.label_names, key, f'le="{_number(bound)}"')
                lines.append(f"{self.name}_bucket{le} {cumulative}")
            inf = _labels(self.label_names, key, 'le="+Inf"')
            plain = _labels(self.label_names, key)
            lines.append(f"{self.name}_bucket{inf} {series.count}")
            lines.append(f"{self.name}_sum{plain} {_number(series.total)}")
            lines.append(f"{self.name}_count{plain} {series.count}")
        return lines


# Seconds; from a health probe (~1 ms) to a multi-GiB streamed fetch (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

HTTP_REQUESTS = Counter(
    "statehub_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    labels=("method", "route", "status"),
)
HTTP_LATENCY = Histogram(
    "statehub_http_request_duration_seconds",
    "Time from a request's arrival until its response body is fully sent.",
    labels=("method", "route", "status"),
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("statehub_http_requests_in_flight", "HTTP requests being answered.")
TENSORS_DECODED = Counter(
    "statehub_fetch_tensors_decoded_total", "Tensors decoded and transformed by fetches."
)
BYTES_FETCHED = Counter("statehub_fetch_bytes_total", "Bytes of fetch bodies sent.")
FETCHES = Counter(
    "statehub_fetches_total",
    "Fetches by how the body was served: passthrough, rewrite, transform, cached (a fit "
    "cache hit streamed), redirect (303 to a presigned store URL) or not_modified (304: the "
    "client's cache holds the body).",
    labels=("mode",),
)
FIT_CACHE = Counter(
    "statehub_fit_cache_total",
    "Fit cache events: hit, miss, stored, skipped (spool short or failing), abandoned (the "
    "body was cut short, its copy discarded), synthesized (not kept: mostly fills or padding), "
    "failed (store refused), dropped (cached blob missing or corrupted), evicted (by gc).",
    labels=("event",),
)
PRESIGNED_REDIRECTS = Counter(
    "statehub_presigned_redirects_total",
    "Responses answered 303 to a presigned blob store URL, by route (fetch, blob).",
    labels=("route",),
)
FETCHES_IN_FLIGHT = Gauge("statehub_fetches_in_flight", "Fetch bodies being streamed.")
PLAN_VERDICTS = Counter(
    "statehub_plan_verdicts_total", "Plans made, by verdict.", labels=("verdict",)
)
BYTES_PUSHED = Counter("statehub_push_bytes_total", "Bytes of uploads received.")
DIRECT_UPLOADS = Counter(
    "statehub_direct_uploads_total",
    "Uploads a client sent straight to the store, by outcome: offered (part URLs handed "
    "out), stored (checked and moved into place), refused (bytes not the ones announced).",
    labels=("outcome",),
)
BYTES_DIRECT = Counter(
    "statehub_direct_upload_bytes_total",
    "Bytes of direct uploads checked and stored (they never passed through the server).",
)
STORAGE_ERRORS = Counter(
    "statehub_storage_errors_total",
    "Requests failed by the database or blob store, by error code.",
    labels=("code",),
)
AUDIT_WRITE_FAILURES = Counter(
    "statehub_audit_write_failures_total",
    "Denied requests whose audit event could not be written (the denial was answered anyway).",
)

ALL: tuple[_Metric, ...] = (
    HTTP_REQUESTS,
    HTTP_LATENCY,
    HTTP_IN_FLIGHT,
    TENSORS_DECODED,
    BYTES_FETCHED,
    FETCHES,
    FIT_CACHE,
    PRESIGNED_REDIRECTS,
    FETCHES_IN_FLIGHT,
    PLAN_VERDICTS,
    BYTES_PUSHED,
    DIRECT_UPLOADS,
    BYTES_DIRECT,
    STORAGE_ERRORS,
    AUDIT_WRITE_FAILURES,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render() -> str:
    return "\n".join(line for metric in ALL for line in metric.render()) + "\n"
