"""Several replicas on one PostgreSQL journal: leases, fencing, failover with nothing lost.

Three relays share one journal. Every unit of work (the RongCloud source, each
WuKongIM uid and channel, the LeanCloud app, each sink) is a lease; the test
kills lease holders with kill -9 at random instants and checks that every unit
is back in service within the lease TTL plus two seconds, that nothing is lost
(RongCloud: beyond the answers in flight at the kills), that the RongCloud
budget held throughout, and counts duplicates. Another test stops PostgreSQL
for 30 seconds under the running cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator
from relay.emulators.wukongim import WuKongIMEmulator
from tests.support.configs import write_config
from tests.support.emulators import serving
from tests.support.postgres import PostgresServer
from tests.support.providers import REAL_WUKONGIM
from tests.support.relay_process import RelayProcess, wait_for
from tests.support.webhook_receiver import WebhookReceiver, receiving
from tests.test_chaos import _in_flight, key_of

pytestmark = pytest.mark.slow

TTL = 5.0
KILLS = int(os.environ.get("RELAY_FAILOVER_KILLS", "10"))
MESSAGES = int(os.environ.get("RELAY_FAILOVER_MESSAGES", "50000"))
SECRET = "whsec_Y2x1c3Rlci10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5"
UIDS = ("u1", "u2", "u3", "u4")


def leases(dsn: str) -> dict[str, tuple[str | None, int]]:
    async def query() -> dict[str, tuple[str | None, int]]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            rows = await conn.fetch("SELECT unit, holder, epoch FROM relay.leases"
                                    " WHERE expires_at > clock_timestamp() OR holder IS NULL")
            return {r["unit"]: (r["holder"], int(r["epoch"])) for r in rows}
        finally:
            await conn.close()

    try:
        return asyncio.run(query())
    except (OSError, asyncpg.PostgresError):
        return {}


@contextmanager
def providers(messages: int) -> Iterator[tuple[Any, Any, Any, set[tuple[str, str]], dict[str,
                                                                                        Any]]]:
    rc = RongCloudEmulator("rc-key", "rc-secret", batch_size=100, budget=10, seed=81)
    wk = WuKongIMEmulator("wk-token", uids=UIDS, channels=(("g1", 2), ("g2", 2)), seed=82,
                          quirks=REAL_WUKONGIM)
    lc = LeanCloudEmulator("lc-app", "lc-master", seed=83)
    share = messages // 3
    expected = {("rc", k) for k in rc.generate(share + messages % 3)}
    expected |= {("wk", str(i)) for i in wk.generate(share // 2)}
    for channel in ("g1", "g2"):
        wk.generate_channel((share - share // 2) // 2, channel, 2)
    expected |= {("wk", str(s.message_id)) for c in ("g1", "g2")
                 for s in wk.channels[(c, 2)].messages}
    extra = messages - len(expected) - share
    expected |= {("lc", i) for i in lc.generate(share + extra, age=30)}
    with serving(rc) as (rc_loop, rc_server), serving(wk) as (_w, wk_server), \
            serving(lc) as (_l, lc_server):
        yield rc, wk, lc, expected, {"rc": rc_server, "wk": wk_server, "lc": lc_server,
                                     "rc_loop": rc_loop}


def replica_config(directory: Path, dsn: str, member: str, servers: dict[str, Any],
                   hook_url: str) -> Path:
    directory.mkdir(exist_ok=True)
    return write_config(
        directory,
        journal={"type": "postgres", "dsn": dsn},
        cluster={"lease_ttl": f"{TTL}s", "member": member},
        sources={
            "rc": {"type": "rongcloud", "app_key": "rc-key", "app_secret": "rc-secret",
                   "base_urls": servers["rc"].urls, "idle_interval": "200ms",
                   "request_deadline": "2s"},
            "wk": {"type": "wukongim", "base_url": servers["wk"].urls[0], "token": "wk-token",
                   "uids": list(UIDS), "channels": [{"id": "g1", "type": 2},
                                                    {"id": "g2", "type": 2}],
                   "idle_interval": "200ms"},
            "lc": {"type": "leancloud", "base_url": servers["lc"].urls[0], "app_id": "lc-app",
                   "master_key": "lc-master", "settle_delay": "1s", "start": "1h",
                   "requests_per_minute": 1200, "idle_interval": "200ms"},
        },
        sinks={"hook": {"type": "webhook", "url": hook_url, "secret": SECRET,
                        "batch_size": 500, "retry_backoff": "100ms",
                        "retry_backoff_max": "1s"}},
        shutdown_grace="5s",
    )


def drained(rc: RongCloudEmulator, wk: WuKongIMEmulator) -> bool:
    return not any(rc.snapshot()["queued"].values()) and \
        not any(wk.unacked(uid) for uid in UIDS)


def delivered(receiver: WebhookReceiver) -> Counter[tuple[str, str]]:
    return Counter(key_of(e) for e in receiver.delivered_events())


def test_failover_under_kill_9_of_lease_holders(tmp_path: Path, postgres_dsn: str) -> None:
    rng = random.Random(2027)
    recoveries: list[float] = []
    kill_times: list[float] = []
    with providers(MESSAGES) as (rc, wk, _lc, expected, servers), \
            receiving(seed=84) as (receiver, hook_url, _hook_loop):
        configs = [replica_config(tmp_path / f"r{i}", postgres_dsn, f"r{i}", servers, hook_url)
                   for i in range(3)]
        replicas = [RelayProcess(c, c.parent / "relay.log").start() for c in configs]
        try:
            def spread() -> Counter[str]:
                # A unit between a release and the next acquire has no holder: counted, three
                # such units would pass for a fourth replica's even share.
                return Counter(holder for holder, _ in leases(postgres_dsn).values() if holder)

            # Nine units over three replicas: three each, once all have joined.
            wait_for(lambda: sorted(spread().items()) == [("r0", 3), ("r1", 3), ("r2", 3)],
                     timeout=60,
                     message="the units spread evenly over the replicas")
            shown = json.loads(subprocess.run(
                [sys.executable, "-m", "relay", "status", "--json", "--config", str(configs[0])],
                capture_output=True, text=True, timeout=60).stdout)
            assert sorted(m["member"] for m in shown["members"]) == ["r0", "r1", "r2"]
            assert len(shown["leases"]) == 9
            assert all(lease["holder"] in ("r0", "r1", "r2") and lease["epoch"] >= 1
                       and lease["expires_in"] > 0 for lease in shown["leases"])
            for _ in range(KILLS):
                time.sleep(rng.uniform(1.0, 3.0))  # a random instant
                held = leases(postgres_dsn)
                victim = rng.choice(sorted({h for h, _ in held.values() if h}))
                index = int(victim.removeprefix("r"))
                lost = {u: e for u, (h, e) in held.items() if h == victim}
                replicas[index].kill9()
                killed_at = time.monotonic()
                kill_times.append(killed_at)

                def taken_over(lost: dict[str, int] = lost, victim: str = victim) -> bool:
                    now = leases(postgres_dsn)
                    return all(now.get(u, (None, 0))[0] not in (None, victim)
                               and now[u][1] > epoch for u, epoch in lost.items())

                wait_for(taken_over, timeout=TTL + 10, interval=0.1,
                         message=f"the units of {victim} back in service")
                recoveries.append(time.monotonic() - killed_at)
                replicas[index].start()
            wait_for(lambda: drained(rc, wk), timeout=240, interval=0.5,
                     message="the providers drained")
            in_flight = _in_flight(servers["rc_loop"].call(lambda: list(rc.served)), kill_times)
            wait_for(lambda: expected - set(delivered(receiver)) <= in_flight, timeout=120,
                     interval=1, message="the webhook to catch up")
        finally:
            for replica in replicas:
                replica.stop()
    seen = delivered(receiver)
    missing = expected - set(seen)
    lost_rc = {k for k in missing if k[0] == "rc"}
    duplicates = sum(n - 1 for n in seen.values())
    over_budget = rc.snapshot()["over_budget"]
    report = (f"failover: {KILLS} kill -9 of lease holders, {len(expected)} messages; units back"
              f" in service after median {statistics.median(recoveries):.1f}s, max"
              f" {max(recoveries):.1f}s (TTL {TTL:.0f}s); missing {len(missing)} (RongCloud in"
              f" flight: {len(in_flight)}), duplicates {duplicates}, over-budget {over_budget}")
    print(report)
    (tmp_path / "failover-report.txt").write_text(report + "\n")
    assert not (missing - lost_rc), "lost WuKongIM or LeanCloud messages"
    assert lost_rc <= in_flight, "lost RongCloud messages beyond the answers in flight"
    assert over_budget == 0
    assert max(recoveries) <= TTL + 2, f"a unit came back only after {max(recoveries):.1f}s"


def test_postgres_stopped_for_30_seconds_loses_nothing(
        tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer) -> None:
    with providers(9000) as (rc, wk, lc, expected, servers), \
            receiving(seed=85) as (receiver, hook_url, _hook_loop):
        configs = [replica_config(tmp_path / f"r{i}", postgres_dsn, f"r{i}", servers, hook_url)
                   for i in range(3)]
        replicas = [RelayProcess(c, c.parent / "relay.log").start() for c in configs]
        try:
            wait_for(lambda: len(delivered(receiver)) >= 1000, timeout=60)
            # Every replica running before the outage (on a loaded machine one can still be
            # importing when the others have delivered 1,000): the outage is the point,
            # not a start-up against a database going down.
            wait_for(lambda: all("relay started" in r.log_text() for r in replicas), timeout=60,
                     message="every replica started")
            postgres_server.stop("fast")
            more = servers["rc_loop"].call(lambda: rc.generate(600))
            expected |= {("rc", k) for k in more}
            time.sleep(30)  # the outage: its length is the test's point
            # Nothing consumed while the journal was gone: RongCloud still holds what came.
            assert sum(rc.snapshot()["queued"].values()) >= len(more) - 300
            postgres_server.start()
            wait_for(lambda: drained(rc, wk), timeout=120, interval=0.5,
                     message="the providers drained after the outage")
            def missing() -> Counter[str]:
                return Counter(k[0] for k in expected - set(delivered(receiver)))

            wait_for(lambda: not missing(), timeout=120, interval=1,
                     message=f"everything delivered after the outage: {missing()} missing")
            assert all(r.running() for r in replicas), "a replica did not survive the outage"
        finally:
            for replica in replicas:
                replica.stop()
    assert rc.snapshot()["over_budget"] == 0
    assert lc.snapshot()["rate_limited"] == 0


def members_of(dsn: str) -> list[str]:
    async def query() -> list[str]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return [r["member"] for r in await conn.fetch("SELECT member FROM relay.members")]
        finally:
            await conn.close()

    return asyncio.run(query())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[bool, dict[str, str], str]:
    """``/readyz`` (ready, checks) and ``/metrics`` of a replica."""
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return ready["ready"], ready["checks"], text


def test_every_replica_is_ready_and_exports_only_the_units_it_runs(
        tmp_path: Path, postgres_dsn: str) -> None:
    """What the Deployment's probes, PodDisruptionBudget and per-instance alerts rely on.

    A replica that runs none of a source's or sink's units is a healthy standby: ready
    (else a rolling update with maxUnavailable 0 never ends, and the PodDisruptionBudget
    blocks every drain), and it exports no state for them (else a stale last-success time
    or sink_up 0 of a unit handed over fires alerts for an instance that no longer runs it).
    """
    rc = RongCloudEmulator("rc-key", "rc-secret", budget=10, seed=86)
    ports = [free_port() for _ in range(3)]
    members = [f"r{i}" for i in range(3)]
    with serving(rc) as (_rc_loop, rc_server), \
            receiving(seed=87) as (_receiver, hook_url, _hook_loop):
        replicas = []
        for member, port in zip(members, ports, strict=True):
            directory = tmp_path / member
            directory.mkdir()
            config = write_config(
                directory,
                journal={"type": "postgres", "dsn": postgres_dsn},
                cluster={"lease_ttl": f"{TTL}s", "member": member},
                metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
                sources={"rc": {"type": "rongcloud", "app_key": "rc-key",
                                "app_secret": "rc-secret", "base_urls": rc_server.urls,
                                "idle_interval": "200ms", "request_deadline": "2s"}},
                sinks={"hook": {"type": "webhook", "url": hook_url, "secret": SECRET}},
                shutdown_grace="5s")
            replicas.append(RelayProcess(config, directory / "relay.log"))

        def holders() -> Counter[str | None]:
            return Counter(h for h, _ in leases(postgres_dsn).values())

        try:
            # Alone, the first replica runs both units.
            replicas[0].start()
            wait_for(lambda: holders() == {"r0": 2}, timeout=60, message="r0 holding both")
            wait_for(lambda: scrape(ports[0])[0], timeout=30, message="r0 ready")
            text = scrape(ports[0])[2]
            assert 'relay_source_last_success_timestamp_seconds{endpoint="person",source="rc"}' \
                in text
            assert 'relay_sink_up{sink="hook"}' in text
            # A second replica joins: one unit moves to it. A third finds nothing to take.
            replicas[1].start()
            wait_for(lambda: holders() == {"r0": 1, "r1": 1}, timeout=60,
                     message="one unit each")
            replicas[2].start()
            wait_for(lambda: len(list(members_of(postgres_dsn))) == 3, timeout=60,
                     message="r2 a member")
            held = {h: u for u, (h, _) in leases(postgres_dsn).items()}
            assert "r2" not in held
            for member, port in zip(members, ports, strict=True):
                runs = held.get(member)
                wait_for(lambda port=port: scrape(port)[0], timeout=30,
                         message=f"{member} ready while it runs {runs or 'nothing'}")
                _, checks, text = scrape(port)
                source_here, sink_here = runs == "source:rc", runs == "sink:hook"
                for family in ("relay_source_last_success_timestamp_seconds",
                               "relay_source_retention_seconds", "relay_source_config_error"):
                    assert (f"{family}{{" in text) == source_here, (member, family)
                for family in ("relay_sink_up", "relay_sink_oldest_pending_age_seconds",
                               "relay_sink_pending_events"):
                    assert (f"{family}{{" in text) == sink_here, (member, family)
                assert (checks["sink hook"] == "standby") != sink_here, (member, checks)
                if not source_here:
                    assert all(state == "standby" for key, state in checks.items()
                               if key.startswith("source rc/")), (member, checks)
        finally:
            for replica in replicas:
                replica.stop()
