"""The batch-fed histograms: what a batch's values add to the buckets, the count and the sum."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from relay import metrics
from relay.journal import NewEvent
from relay.sources.base import observe_batch


def _samples(histogram: metrics.BatchHistogram, source: str = "rc") -> dict[str, float]:
    (family,) = histogram.collect()
    return {f"{s.name}{{le={s.labels.get('le', '')}}}": s.value for s in family.samples
            if s.labels["source"] == source}


def test_observe_many_and_observe_counted_fill_the_same_series() -> None:
    histogram = metrics.BatchHistogram("t_seconds", "test", ["source"], [0.1, 1.0, 10.0],
                                       CollectorRegistry())
    histogram.observe_many(("rc",), [0.05, 0.1, 0.5, 20.0])
    histogram.observe_counted(("rc",), [(2.0, 3)])
    got = _samples(histogram)
    assert got["t_seconds_bucket{le=0.1}"] == 2  # 0.1 itself is within its bucket
    assert got["t_seconds_bucket{le=1.0}"] == 3
    assert got["t_seconds_bucket{le=10.0}"] == 6
    assert got["t_seconds_bucket{le=+Inf}"] == 7
    assert got["t_seconds_count{le=}"] == 7
    assert abs(got["t_seconds_sum{le=}"] - (0.05 + 0.1 + 0.5 + 20.0 + 6.0)) < 1e-9


def test_a_batch_from_a_clock_ahead_of_ours_counts_no_negative_latency() -> None:
    def event(sent_at: int) -> NewEvent:
        return NewEvent(f"rc:{sent_at}", 10_000, b"[]", b"{}", sent_at)

    age = observe_batch("skewed-batch", "person", [event(8_000), event(12_000)], 10_000)
    got = _samples(metrics.SOURCE_FETCH_LATENCY, "skewed-batch")
    assert age == 2.0  # the oldest event's
    assert got["relay_source_fetch_latency_seconds_count{le=}"] == 2
    assert got["relay_source_fetch_latency_seconds_sum{le=}"] == 2.0  # 2 s and 0 s, not -2 s


def test_every_provider_exchange_is_timed_answered_or_not() -> None:
    # What a round of a polling loop spends waiting for the provider, beside
    # relay_journal_commit_seconds: the two halves of every consume-on-read round.
    import asyncio
    import socket

    from relay.sources.http import RESPONSE, ProviderClient

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.05)  # the provider taking its time (server side)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/x"

    async def main() -> list[str]:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
        client = ProviderClient("timed-source", connect_timeout=5, read_timeout=5,
                                verify_tls=True)
        kinds = [(await client.request("GET", url)).kind,
                 (await client.request("GET", refused)).kind]
        await client.aclose()
        server.close()
        await server.wait_closed()
        return kinds

    kinds = asyncio.run(main())
    assert kinds[0] == RESPONSE
    assert kinds[1] != RESPONSE
    labels = {"source": "timed-source"}
    assert metrics.REGISTRY.get_sample_value("relay_source_request_seconds_count", labels) == 2
    sum_ = metrics.REGISTRY.get_sample_value("relay_source_request_seconds_sum", labels)
    assert sum_ is not None
    assert sum_ >= 0.05
