"""Every Prometheus metric the relay exports, in one registry.

Names follow ``relay_<noun>_<unit>``; labels are low-cardinality only
(source, endpoint, sink, outcome) — never event ids, user ids or URLs.
"""

from __future__ import annotations

import contextlib
import platform
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from enum import StrEnum

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from relay import __version__

# The *_created series double the series count and nothing here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
# Resident memory, CPU, open files, start time: what the deployment limits are checked against.
ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 1800.0, 3600.0, 10800.0)



class BatchHistogram(Collector):
    """A labelled histogram fed a whole batch at a time.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets
    per value; at tens of thousands of events per second that is a visible
    share of the relay's CPU. This one bisects per value and locks per batch.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = sorted(buckets)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        """Observe each of ``values`` once (a batch's events, one latency each)."""
        bounds = self.bounds
        with self._lock:
            counts, total = self._series_of(labels)
            added = 0.0
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                added += value
            total[0] += added

    def _series_of(self, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        series = self._series.get(labels)
        if series is None:
            series = ([0] * (len(self.bounds) + 1), [0.0])
            self._series[labels] = series
        return series

    def observe_counted(self, labels: tuple[str, ...], pairs: Iterable[tuple[float, int]]) -> None:
        """Observe each ``value`` ``count`` times (events of one fetch share their latency)."""
        bounds = self.bounds
        with self._lock:
            counts, total = self._series_of(labels)
            for value, count in pairs:
                counts[bisect_left(bounds, value)] += count
                total[0] += value * count

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = self._family()
        with self._lock:
            snapshot = [(k, list(c), t[0]) for k, (c, t) in self._series.items()]
        for labels, counts, total in snapshot:
            cumulative = 0
            buckets = []
            for bound, count in zip(self.bounds, counts, strict=False):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            family.add_metric(list(labels), buckets, total)
        yield family


def _bound_text(bound: float) -> str:
    return repr(float(bound))


BUILD_INFO = Info("relay_build", "Version of the running relay.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})

# -- sources -----------------------------------------------------------------
SOURCE_REQUESTS = Counter(
    "relay_source_requests_total",
    "Requests to provider APIs by outcome (ok, empty, throttled, config_error, transient_error,"
    " connect_error, timeout, malformed, too_large, local_error).",
    ["source", "endpoint", "outcome"],
    registry=REGISTRY,
)
SOURCE_BUDGET_WAITS = Counter(
    "relay_source_budget_waits_total",
    "Requests held back by the relay's own request budget (over-budget requests avoided).",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_SUSPECTED_THROTTLED = Counter(
    "relay_source_suspected_throttled_total",
    "Empty answers right after a non-empty one: possibly a provider-side throttle.",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_EVENTS = Counter(
    "relay_source_events_total",
    "Records fetched from providers by outcome (new, duplicate, quarantined).",
    ["source", "endpoint", "outcome"],
    registry=REGISTRY,
)
SOURCE_POSSIBLE_LOSS = Counter(
    "relay_source_possible_loss_total",
    "Responses of consume-on-read endpoints that were not fully received: their batch may be lost.",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_DATA_AGE = Gauge(
    "relay_source_data_age_seconds",
    "Age of the oldest record in the last non-empty batch (provider time to fetch).",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_LAST_SUCCESS = Gauge(
    "relay_source_last_success_timestamp_seconds",
    "Unix time of the last successful poll of the endpoint.",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_RETENTION = Gauge(
    "relay_source_retention_seconds",
    "How long the provider keeps undelivered data for this endpoint (0 = unbounded).",
    ["source", "endpoint"],
    registry=REGISTRY,
)
SOURCE_FAILOVERS = Counter(
    "relay_source_failovers_total",
    "Switches to the next base URL.",
    ["source"],
    registry=REGISTRY,
)
SOURCE_CONFIG_ERROR = Gauge(
    "relay_source_config_error",
    "1 while the provider rejects the relay's credentials or configuration.",
    ["source"],
    registry=REGISTRY,
)
SOURCE_SEQ_GAPS = Counter(
    "relay_source_seq_gaps_total",
    "Messages missing from a provider sequence (gaps in message_seq).",
    ["source"],
    registry=REGISTRY,
)
SOURCE_FETCH_LATENCY = BatchHistogram(
    "relay_source_fetch_latency_seconds",
    "Provider server time of a record to its fetch by the relay.",
    ["source"],
    _LATENCY_BUCKETS,
    REGISTRY,
)
SOURCE_CLOCK_SKEW = Gauge(
    "relay_source_clock_skew_seconds",
    "Provider Date header minus local clock at the last response.",
    ["source"],
    registry=REGISTRY,
)

# -- journal -----------------------------------------------------------------
JOURNAL_EVENTS = Gauge("relay_journal_events", "Events held in the journal.", registry=REGISTRY)
JOURNAL_BYTES = Gauge(
    "relay_journal_size_bytes", "Size of the journal's files.", registry=REGISTRY
)
JOURNAL_LIMIT_BYTES = Gauge(
    "relay_journal_limit_bytes",
    "Configured journal size at which the relay alerts (0 = none).",
    registry=REGISTRY,
)
JOURNAL_LAST_SEQ = Gauge(
    "relay_journal_last_seq", "Highest journal sequence number.", registry=REGISTRY
)
JOURNAL_FULL = Gauge(
    "relay_journal_disk_full",
    "1 while the journal's file system is full and sources are paused.",
    registry=REGISTRY,
)
JOURNAL_UP = Gauge(
    "relay_journal_up",
    "1 while the journal's storage answers; 0 while its database cannot be reached.",
    registry=REGISTRY,
)
SOURCE_REQUEST_SECONDS = Histogram(
    "relay_source_request_seconds",
    "Time of one provider request, from sending it to its answer read (or its failure).",
    ["source"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0),
    registry=REGISTRY,
)
JOURNAL_COMMIT_SECONDS = Histogram(
    "relay_journal_commit_seconds",
    "Time to commit one fetched batch.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
JOURNAL_QUARANTINED = Gauge(
    "relay_journal_quarantined_records", "Unparseable provider records kept raw.", registry=REGISTRY
)
JOURNAL_COMPACTED = Counter(
    "relay_journal_compacted_events_total", "Events removed by compaction.", registry=REGISTRY
)

# -- sinks -------------------------------------------------------------------
SINK_DELIVERED = Counter(
    "relay_sink_delivered_events_total", "Events acknowledged by the sink.", ["sink"],
    registry=REGISTRY,
)
SINK_FILTERED = Counter(
    "relay_sink_filtered_events_total", "Events skipped by the sink's routing filters.", ["sink"],
    registry=REGISTRY,
)
SINK_ATTEMPTS = Counter(
    "relay_sink_delivery_attempts_total",
    "Delivery attempts by outcome (ok, retry, dead_letter, paused).",
    ["sink", "outcome"],
    registry=REGISTRY,
)
SINK_DEAD_LETTERS = Counter(
    "relay_sink_dead_letters_total", "Events moved to the dead-letter store.", ["sink"],
    registry=REGISTRY,
)
SINK_PENDING = Gauge(
    "relay_sink_pending_events", "Journal events not yet delivered by the sink.", ["sink"],
    registry=REGISTRY,
)
SINK_OLDEST_PENDING_AGE = Gauge(
    "relay_sink_oldest_pending_age_seconds",
    "Age (since fetch) of the oldest event the sink has not delivered; 0 when caught up.",
    ["sink"],
    registry=REGISTRY,
)
SINK_UP = Gauge(
    "relay_sink_up", "1 while the sink's last delivery succeeded.", ["sink"], registry=REGISTRY
)
SINK_LATENCY = BatchHistogram(
    "relay_sink_delivery_latency_seconds",
    "Fetch of an event by the relay to its acknowledgement by the sink.",
    ["sink"],
    _LATENCY_BUCKETS,
    REGISTRY,
)


# -- cluster -------------------------------------------------------------------
CLUSTER_MEMBERS = Gauge(
    "relay_cluster_members", "Relays taking part in the cluster, as this one counts them.",
    registry=REGISTRY,
)
CLUSTER_LEASES_HELD = Gauge(
    "relay_cluster_leases_held", "Units of work (sources' units, sinks) this relay holds.",
    registry=REGISTRY,
)
CLUSTER_LEASE_MOVES = Counter(
    "relay_cluster_lease_moves_total",
    "Leases this relay acquired, released (rebalancing) or lost (taken over).",
    ["outcome"],
    registry=REGISTRY,
)


def init_cluster() -> None:
    for outcome in ("acquired", "released", "lost"):
        CLUSTER_LEASE_MOVES.labels(outcome)


class RequestOutcome(StrEnum):
    """How one provider request went: the ``outcome`` label of ``relay_source_requests_total``."""

    OK = "ok"
    EMPTY = "empty"
    THROTTLED = "throttled"
    CONFIG = "config_error"
    TRANSIENT = "transient_error"
    CONNECT = "connect_error"
    TIMEOUT = "timeout"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    LOCAL = "local_error"


def init_source(source: str, endpoints: Sequence[str], retention: float = 0.0) -> None:
    """Create a source's series at zero, so that the first increment is visible to increase()."""
    SOURCE_CONFIG_ERROR.labels(source).set(0)
    SOURCE_FAILOVERS.labels(source)
    SOURCE_SEQ_GAPS.labels(source)
    for endpoint in endpoints:
        for outcome in RequestOutcome:
            SOURCE_REQUESTS.labels(source, endpoint, outcome)
        for counted in ("new", "duplicate", "quarantined"):
            SOURCE_EVENTS.labels(source, endpoint, counted)
        SOURCE_POSSIBLE_LOSS.labels(source, endpoint)
        SOURCE_BUDGET_WAITS.labels(source, endpoint)
        SOURCE_SUSPECTED_THROTTLED.labels(source, endpoint)
        SOURCE_RETENTION.labels(source, endpoint).set(retention)


def init_sink(sink: str) -> None:
    """Create a sink's series at zero (see :func:`init_source`)."""
    SINK_DELIVERED.labels(sink)
    SINK_FILTERED.labels(sink)
    SINK_DEAD_LETTERS.labels(sink)
    for outcome in ("ok", "retry", "dead_letter", "paused", "refused"):
        SINK_ATTEMPTS.labels(sink, outcome)
    SINK_PENDING.labels(sink).set(0)
    SINK_OLDEST_PENDING_AGE.labels(sink).set(0)

def _remove_where(gauge: Gauge, first_label: str) -> None:
    for family in gauge.collect():
        for sample in family.samples:
            values = tuple(sample.labels.values())
            if values and values[0] == first_label:
                with contextlib.suppress(KeyError):  # removed meanwhile
                    gauge.remove(*values)


def forget_source(source: str) -> None:
    """Drop the gauges describing a source's state: none of its units runs here any more.

    Counters stay (an idle counter alerts nobody); a gauge would keep its last value.
    """
    for gauge in (SOURCE_DATA_AGE, SOURCE_LAST_SUCCESS, SOURCE_RETENTION, SOURCE_CONFIG_ERROR,
                  SOURCE_CLOCK_SKEW):
        _remove_where(gauge, source)


def forget_sink(sink: str) -> None:
    """Drop the gauges describing a sink's state: it is not delivering from here any more."""
    for gauge in (SINK_UP, SINK_PENDING, SINK_OLDEST_PENDING_AGE):
        _remove_where(gauge, sink)

# -- evacuation (relay evacuate) ---------------------------------------------
EVACUATION_EXPORTED = Gauge(
    "relay_evacuation_exported_messages",
    "History messages journaled (or quarantined) by the evacuation so far, across restarts.",
    ["source"], registry=REGISTRY,
)
EVACUATION_FIRST_MESSAGE = Gauge(
    "relay_evacuation_first_message_timestamp_seconds",
    "Provider time of the first message the evacuation read.", ["source"], registry=REGISTRY,
)
EVACUATION_CURSOR = Gauge(
    "relay_evacuation_cursor_timestamp_seconds",
    "Provider time the evacuation has read the history up to.", ["source"], registry=REGISTRY,
)
EVACUATION_REQUESTS = Counter(
    "relay_evacuation_requests_total",
    "Requests the evacuation made, by purpose (history, conversations, chatrooms, verify) and"
    " outcome (ok, throttled, error).",
    ["source", "purpose", "outcome"], registry=REGISTRY,
)
EVACUATION_BUDGET = Gauge(
    "relay_evacuation_request_budget_per_minute",
    "The evacuation's request budget (its share of the app's quota).", ["source"],
    registry=REGISTRY,
)
EVACUATION_REQUESTS_LAST_MINUTE = Gauge(
    "relay_evacuation_requests_last_minute",
    "Requests in flight or made within the last minute, against the budget.", ["source"],
    registry=REGISTRY,
)
EVACUATION_RATE = Gauge(
    "relay_evacuation_rate_messages_per_second",
    "Messages exported per second, over the last minute.", ["source"], registry=REGISTRY,
)
EVACUATION_ETA = Gauge(
    "relay_evacuation_eta_seconds",
    "Estimated seconds until the current phase ends, from the observed rate (-1 = unknown).",
    ["source"], registry=REGISTRY,
)
EVACUATION_PHASE = Gauge(
    "relay_evacuation_phase",
    "1 for the evacuation's current phase (drain, verify, done).", ["source", "phase"],
    registry=REGISTRY,
)
EVACUATION_CONVERSATIONS = Gauge(
    "relay_evacuation_conversations",
    "Conversations of the completeness check by outcome (total, checked, matching, repaired,"
    " unverified).", ["source", "outcome"], registry=REGISTRY,
)
EVACUATION_REPAIRED = Gauge(
    "relay_evacuation_repaired_messages",
    "Messages the completeness check found missing and fetched.", ["source"], registry=REGISTRY,
)
