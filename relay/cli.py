"""The ``relay`` command line.

Exit status: 0 success; 1 a check or command failed; 2 bad configuration or
usage (the message names the key), or the journal is held by another relay.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.to_thread
import click
from pydantic import ValidationError

from relay import __version__
from relay.checks import CheckResult
from relay.config import AdminView, ConfigError, RelayConfig, load_admin_view, load_config
from relay.config_base import parse_point_in_time
from relay.event import json_schema
from relay.journal import (
    Journal,
    JournalError,
    JournalLockedError,
    JournalStats,
    JournalUnusableError,
    Lease,
    Member,
    check_journal,
    open_journal,
)
from relay.logs import configure_logging, register_secrets

_T = TypeVar("_T")


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"relay: error: {message}", err=True)
    sys.exit(code)


def config_failure(exc: ConfigError) -> NoReturn:
    """Every problem of a configuration, one per line, and exit 2."""
    if len(exc.problems) == 1:
        fail(f"invalid configuration: {exc.problems[0]}")
    fail(f"invalid configuration ({len(exc.problems)} problems):\n"
         + "\n".join(f"  {problem}" for problem in exc.problems))


def _load(config_file: str | None, **kwargs: Any) -> RelayConfig:
    try:
        config = load_config(config_file, **kwargs)
    except ConfigError as exc:
        config_failure(exc)
    register_secrets(config.secret_values())
    return config


config_option = click.option(
    "--config", "config_file", metavar="FILE", envvar="RELAY_CONFIG_FILE",
    help="TOML configuration (default: $RELAY_CONFIG_FILE or ./relay.toml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             invoke_without_command=True)
@click.version_option(__version__, prog_name="relay")
@click.pass_context
def main(ctx: click.Context) -> None:
    """IM Relay: RongCloud, WuKongIM and LeanCloud messages → journal → Kafka, webhooks, files."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())  # asking for nothing is not a usage error
        ctx.exit(0)


@main.command()
@config_option
def run(config_file: str | None) -> None:
    """Run the relay until SIGTERM/SIGINT."""
    config = _load(config_file)
    configure_logging(config.log.level, config.log.format)
    _run_relay(config)


# Allocations (less deallocations) of container objects between two collections of the
# youngest generation; Python's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def tune_collector() -> None:
    """Keep the cycle collector off the hot path of a long-running relay.

    Everything alive once the relay is built (modules, configuration, pydantic's
    schemas: some 60,000 containers) lives as long as the process, so it is frozen
    out of the collector's reach; the older generations' collections traversed all
    of it, 27 ms each, stalling every source and sink. A drain allocates and frees
    dicts by the hundred per answer, nearly all freed by reference counting, so
    the youngest generation is collected after 10,000 net allocations rather than
    700. Measured on a 200,000-event drain: 456 collections taking 0.22 s of CPU
    before, 2 taking 3.5 ms after. (No collection first: at this point it found
    nothing to free and cost 22 ms of every start.)
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _run_relay(config: RelayConfig, on_ready: Callable[[Any], Any] | None = None) -> None:
    from relay.app import Relay, StartupError

    relay = Relay(config)
    tune_collector()
    try:
        anyio.run(relay.run, on_ready)
    except (JournalLockedError, JournalUnusableError, StartupError) as exc:
        fail(str(exc))
    except JournalError as exc:
        fail(str(exc), 1)


@main.command()
@config_option
@click.option("--source", "source_name", required=True, metavar="NAME",
              help="The LeanCloud source whose whole history to export.")
@click.option("--exit-when-done", is_flag=True,
              help="Exit once verified, reported and delivered (0 complete, 1 not).")
def evacuate(config_file: str | None, source_name: str, exit_when_done: bool) -> None:
    """Export a LeanCloud app's whole history and conversations, verify it, report.

    Runs the relay as `relay run` does, with this source reading from the first
    message ever; resumable after any stop. See README "Leaving LeanCloud".
    """
    from relay.evacuate import EvacuationError, run_evacuation

    config = _load(config_file, require_components=False)
    if not config.sources:
        fail("sources: at least one [sources.NAME] table is required")
    configure_logging(config.log.level, config.log.format)
    try:
        code = run_evacuation(config, source_name, exit_when_done=exit_when_done)
    except EvacuationError as exc:
        fail(str(exc))
    except JournalLockedError as exc:
        fail(str(exc))
    except JournalError as exc:
        fail(str(exc), 1)
    sys.exit(code)


def stats_url(listen: str) -> str:
    """Where a running relay serves ``/stats``, from its ``metrics.listen``."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 - reading, not binding
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"http://{host}:{port}/stats"


@main.command()
@config_option
@click.option("--url", help="The relay's /stats URL (default: from metrics.listen).")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
def top(config_file: str | None, url: str | None, interval: float, once: bool) -> None:
    """A live view of a running relay: sources, sinks and the journal, every second."""
    from relay.top import run

    if url is None:
        try:
            config = load_config(config_file, require_components=False)
        except ConfigError as exc:
            config_failure(exc)
        if not config.metrics.enabled:
            fail("metrics.enabled is false: the relay serves no /stats to read")
        url = stats_url(config.metrics.listen)
    with contextlib.suppress(KeyboardInterrupt):
        run(url, interval=interval, iterations=1 if once else None, quiet_first=once)


@main.command("config-schema")
def config_schema() -> None:
    """Print the JSON Schema of the configuration (relay.toml), for editors and CI."""
    from relay.config import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2, ensure_ascii=False))


@main.command()
def schema() -> None:
    """Print the JSON Schema of the normalized event (im-relay.event/1)."""
    click.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))


def _ago(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = max(0.0, time.time() - ms / 1000)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _format_status(stats: JournalStats) -> str:
    lines = [
        f"journal     {stats.path}",
        f"size        {stats.bytes / 1e6:.1f} MB",
        f"events      {stats.events} held, last seq {stats.max_seq}, oldest fetched "
        f"{_ago(stats.oldest_fetched_at)}",
        f"quarantined {stats.quarantined}",
        f"dead letters {stats.dead_letters}",
        "",
        f"{'sink':<20} {'cursor':>10} {'pending':>10}  oldest pending",
    ]
    for sink in stats.sinks:
        lag = _ago(sink.oldest_pending_fetched_at) if sink.pending else "caught up"
        lines.append(f"{sink.sink:<20} {sink.cursor:>10} {sink.pending:>10}  {lag}")
    from relay.progress import status_lines

    lines += status_lines(stats.cursors)
    if stats.cursors:
        lines += ["", "source cursors"]
        for key, value in stats.cursors.items():
            if key.endswith((":evacuation", ":evacuation:drain")):
                continue  # shown above, as figures
            if key.startswith("@sink:"):
                continue  # a sink's replay mark, not a source's cursor
            shown = value
            if key.endswith("_ms") and value.isdigit():
                shown = f"{_iso(int(value))} ({_ago(int(value))})"
            lines.append(f"  {key:<40} {shown}")
    return "\n".join(lines)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_file: str | None, as_json: bool) -> None:
    """Journal depth, source cursors and the lag of every sink."""
    view = _admin_view(config_file)

    async def read() -> tuple[JournalStats, list[Member], list[Lease]]:
        journal = await open_journal(view.journal, mode="status")
        try:
            return (await journal.stats(), await journal.members(view.cluster.lease_ttl),
                    await journal.leases())
        finally:
            await journal.close()

    try:
        stats, members, leases = anyio.run(read)
    except JournalError as exc:
        fail(str(exc), 1)
    live = _live_figures(view)
    if as_json:
        from dataclasses import asdict

        from relay.progress import status_entries

        click.echo(json.dumps({
            **asdict(stats), "evacuations": [f.to_json() for f in status_entries(stats.cursors)],
            "members": [asdict(m) for m in members],
            "leases": [{**asdict(lease), "expires_in": lease.expires_in
                        if lease.expires_in != float("inf") else None} for lease in leases],
            "running": live}, indent=2))
    else:
        click.echo(_format_status(stats))
        if members or leases:
            click.echo(_format_cluster(members, leases))
        click.echo(_format_live(live))


def _format_cluster(members: list[Member], leases: list[Lease]) -> str:
    lines = ["", f"cluster     {len(members)} member(s)"]
    for m in members:
        lines.append(f"  {m.member:<40} {m.description}, seen {m.seen_ago:.1f}s ago")
    lines.append(f"{'lease':<36} {'holder':<32} {'epoch':>6}  expires")
    for lease in leases:
        expiry = "-" if lease.holder is None else \
            ("expired" if lease.expires_in < 0 else f"in {lease.expires_in:.1f}s")
        lines.append(f"{lease.unit:<36} {lease.holder or '(free)':<32} {lease.epoch:>6}  {expiry}")
    return "\n".join(lines)


def _live_figures(view: AdminView) -> dict[str, Any] | None:
    """The running relay's own figures (its /stats), if it runs and serves them."""
    if not view.metrics.enabled:
        return None
    import httpx

    from relay.top import fetch

    try:
        return fetch(stats_url(view.metrics.listen), timeout=2.0)
    except (httpx.HTTPError, ValueError):
        return None


def _format_live(live: dict[str, Any] | None) -> str:
    if live is None:
        return "\nrunning relay: not reachable (stopped, or metrics off)"
    lines = ["", f"running relay: pid {live['relay']['pid']}",
             f"{'source/endpoint':<32} {'state':<13} last error"]
    for r in live["sources"]:
        lines.append(f"{r['source'] + '/' + r['endpoint']:<32} {r['state']:<13}"
                     f" {r['last_error'][:80]}")
    lines.append(f"{'sink':<32} {'state':<13} last error")
    for r in live["sinks"]:
        lines.append(f"{r['sink']:<32} {r['state']:<13} {r['last_error'][:80]}")
    return "\n".join(lines)


@main.command()
@config_option
@click.option("--offline", is_flag=True,
              help="Only validate the configuration and the local environment (journal folder,"
                   " listen address): reach no provider and no destination.")
def check(config_file: str | None, offline: bool) -> None:
    """Validate the configuration and reach every endpoint without consuming anything."""
    config = _load(config_file)
    configure_logging("error", "console")
    # aiokafka and aiohttp log through the standard library: a failed check is reported
    # below, once, not also as a stray library line.
    logging.getLogger().setLevel(logging.CRITICAL)
    results = [anyio.run(partial(check_journal, config.journal, offline=offline))]
    if config.metrics.enabled:
        results.append(_check_listen(config.metrics.listen, held=results[0].warning))

    async def probe() -> list[Any]:
        from relay.sinks import build_sink
        from relay.sources import build_source

        found: list[Any] = []
        for name, cfg in config.sources.items():
            found.extend(await build_source(name, cfg).check())
        for name, sink_cfg in config.sinks.items():
            found.extend(await build_sink(name, sink_cfg).check())
        return found

    if not offline:
        results += anyio.run(probe)
    click.echo(f"configuration ok: {len(config.sources)} source(s), {len(config.sinks)} sink(s)"
               + (" (offline: no provider or destination reached)" if offline else ""))
    failed = 0
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        if r.ok and r.warning:
            mark = "warn"
        failed += 0 if r.ok else 1
        click.echo(f"{mark} {r.component:<24} {r.target}: {r.detail}")
    sys.exit(1 if failed else 0)


def _check_listen(listen: str, *, held: bool) -> CheckResult:
    """Whether the metrics address can be listened on (a running relay already holds it)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as exc:
        detail = exc.strerror or str(exc)
        if held:
            return CheckResult("metrics.listen", listen, True,
                               f"{detail} (the running relay holds it)", warning=True)
        return CheckResult("metrics.listen", listen, False, detail)
    return CheckResult("metrics.listen", listen, True, "free to listen on")


# -- dead letters and replay ------------------------------------------------


def _admin_view(config_file: str | None) -> AdminView:
    try:
        return load_admin_view(config_file)
    except ConfigError as exc:
        config_failure(exc)


async def _admin_journal(view: AdminView) -> Journal:
    try:
        return await open_journal(view.journal, mode="admin")
    except JournalError as exc:
        fail(str(exc), 1)


def _with_journal(view: AdminView, action: Callable[[Journal], Awaitable[_T]]) -> _T:
    """Run ``action`` on the journal opened beside a possibly running relay."""

    async def run() -> _T:
        journal = await _admin_journal(view)
        try:
            return await action(journal)
        finally:
            await journal.close()

    return anyio.run(run)


def _known_sink(view: AdminView, sink: str | None) -> None:
    if sink is not None and sink not in view.sinks:
        fail(f"no sink named {sink!r} in the configuration (sinks: "
             f"{', '.join(view.sinks) or 'none'})")


@main.group()
def dlq() -> None:
    """Dead letters: events a sink's destination refused for good."""


@dlq.command("list")
@config_option
@click.option("--sink", help="Only this sink's dead letters.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dlq_list(config_file: str | None, sink: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first."""
    view = _admin_view(config_file)
    _known_sink(view, sink)

    letters = _with_journal(view, lambda journal: journal.dead_letters(sink, limit))
    if as_json:
        click.echo(json.dumps([{"id": d.dlid, "sink": d.sink, "event_id": d.event_id,
                                "error": d.error, "attempts": d.attempts,
                                "failed_at": _iso(d.failed_at), "replay_requested": d.replay}
                               for d in letters], indent=2))
        return
    if not letters:
        click.echo("no dead letters")
        return
    click.echo(f"{'id':>6}  {'sink':<14} {'failed at':<20} {'tries':>5}  event / error")
    for d in letters:
        flag = " (replay requested)" if d.replay else ""
        click.echo(f"{d.dlid:>6}  {d.sink:<14} {_iso(d.failed_at):<20} {d.attempts:>5}  "
                   f"{d.event_id}{flag}\n{'':>50}{d.error[:120]}")


@dlq.command("show")
@config_option
@click.argument("dlid", type=int)
def dlq_show(config_file: str | None, dlid: int) -> None:
    """One dead letter with its event."""
    view = _admin_view(config_file)

    letters = _with_journal(view, lambda journal: journal.dead_letters(None, 1, dlid=dlid))
    if not letters:
        fail(f"no dead letter {dlid}", 1)
    d = letters[0]
    click.echo(json.dumps({"id": d.dlid, "sink": d.sink, "event_seq": d.event_seq,
                           "event_id": d.event_id, "error": d.error, "attempts": d.attempts,
                           "failed_at": _iso(d.failed_at), "replay_requested": d.replay,
                           "event": json.loads(d.payload)}, indent=2, ensure_ascii=False))


def _selection(verb: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options choosing which dead letters a command acts on (checked by _selected)."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        command = click.option("--all", "everything", is_flag=True,
                               help=f"{verb} every dead letter.")(command)
        command = click.option("--id", "dlids", type=int, multiple=True,
                               help="A dead letter id (repeatable).")(command)
        command = click.option("--sink", help=f"{verb} all of this sink's dead letters.")(command)
        return config_option(command)

    return decorate


def _selected(config_file: str | None, sink: str | None, dlids: tuple[int, ...],
              everything: bool, verb: str) -> AdminView:
    view = _admin_view(config_file)
    _known_sink(view, sink)
    if not (sink or dlids or everything):
        fail(f"say what to {verb}: --sink NAME, --id N or --all")
    return view


@dlq.command("replay")
@_selection("Replay")
def dlq_replay(config_file: str | None, sink: str | None, dlids: tuple[int, ...],
               everything: bool) -> None:
    """Re-deliver dead letters through their sink (by the running relay, or at its next start)."""
    view = _selected(config_file, sink, dlids, everything, "replay")
    count = _with_journal(view, lambda journal: journal.request_dead_letter_replay(
        sink, list(dlids)))
    click.echo(f"{count} dead letter(s) marked for replay; the running relay delivers them"
               " within seconds (or at its next start) and removes those delivered")


@dlq.command("purge")
@_selection("Purge")
def dlq_purge(config_file: str | None, sink: str | None, dlids: tuple[int, ...],
              everything: bool) -> None:
    """Delete dead letters for good."""
    view = _selected(config_file, sink, dlids, everything, "purge")
    count = _with_journal(view, lambda journal: journal.remove_dead_letters(
        list(dlids), sink=sink, everything=everything))
    click.echo(f"{count} dead letter(s) purged")


@main.command()
@config_option
@click.option("--sink", required=True, help="The sink to re-feed.")
@click.option("--since", required=True,
              help="RFC 3339 time (2026-11-25T08:00:00Z) or a duration back (2h, 30m).")
def replay(config_file: str | None, sink: str, since: str) -> None:
    """Re-deliver to a sink everything the journal holds from a point in time."""
    view = _admin_view(config_file)
    _known_sink(view, sink)
    try:
        since_ms = parse_point_in_time(since, int(time.time() * 1000))
    except ValueError as exc:
        fail(f"--since: {exc}")

    async def request(journal: Journal) -> tuple[int, int, int | None]:
        cursor = await journal.sink_cursor(sink)
        await journal.request_control(sink, "replay", str(since_ms))
        again = await journal.count_since(since_ms, through_seq=cursor)
        held = await journal.count_since(since_ms)
        return again, held - again, (await journal.stats()).oldest_fetched_at

    again, pending, oldest = _with_journal(view, request)
    click.echo(f"replay of sink {sink} from {_iso(since_ms)} requested: {again} event(s) it has"
               f" delivered will be delivered again, and {pending} not yet delivered follow, by"
               " the running relay within a second (or at its next start); replay never skips"
               " undelivered events")
    if oldest is not None and oldest > since_ms:
        click.echo(f"note: the journal holds events only from {_iso(oldest)} on (journal.retain);"
                   " nothing older can be replayed", err=True)


@main.command()
@config_option
@click.option("--user", "user_id", required=True, help="The provider's user id.")
@click.option("--dry-run", is_flag=True, help="Only count what would be erased.")
def erase(config_file: str | None, user_id: str, dry_run: bool) -> None:
    """Erase one user's events (sender or recipient) from the journal and the file sinks.

    The relay must be stopped (the journal is rewritten). Kafka topics and webhook
    receivers hold their own copies: erase there too.
    """
    from relay.sinks.file import FileEraseError, FileSinkConfig, erase_user_from_files

    config = _load(config_file, require_components=False)

    async def apply() -> dict[str, int]:
        # Counting changes nothing: it may run beside a running relay.
        journal = await open_journal(config.journal, mode="admin" if dry_run else "writer")
        try:
            counts = await journal.erase_user(user_id, dry_run=dry_run)
        finally:
            await journal.close()
        for name, sink in config.sinks.items():
            if isinstance(sink, FileSinkConfig):
                counts[f"file sink {name}"] = await anyio.to_thread.run_sync(
                    partial(erase_user_from_files, Path(sink.path), user_id, dry_run=dry_run))
        return counts

    try:
        counts = anyio.run(apply)
    except JournalLockedError:
        fail("the relay is running on this journal: stop it, then erase", 2)
    except (JournalError, FileEraseError) as exc:
        fail(str(exc), 1)
    verb = "would erase" if dry_run else "erased"
    for where, count in counts.items():
        click.echo(f"{verb} {count} record(s) from {where}")
    others = [n for n, s in config.sinks.items() if not isinstance(s, FileSinkConfig)]
    if others:
        click.echo(f"not erased here (erase downstream): {', '.join(others)}")


# -- moving the journal --------------------------------------------------------


@main.group("journal")
def journal_group() -> None:
    """Journal maintenance."""


@journal_group.command("copy")
@click.option("--from", "source", required=True, metavar="sqlite:PATH",
              help="The SQLite journal to copy (the relay on it must be stopped).")
@click.option("--to", "target", metavar="postgresql://USER@HOST:PORT/DB",
              help="The PostgreSQL database (a password here shows in the process list:"
                   " prefer --to-dsn-file).")
@click.option("--to-dsn-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A file holding the target DSN.")
@click.option("--schema", default="relay", show_default=True,
              help="The target journal's schema ([journal] schema).")
@click.option("--replace-target", is_flag=True,
              help="Empty a target that holds other data first (its relays must be stopped).")
def journal_copy(source: str, target: str | None, to_dsn_file: str | None, schema: str,
                 replace_target: bool) -> None:
    """Move an installation to the shared journal: every event, cursor and dead letter.

    Safe to run again: a target holding an earlier copy of the same journal, not
    written to since, is left as it is. Any other non-empty target is refused
    unless --replace-target.
    """
    from relay.config import JournalConfig
    from relay.journal.copy import copy_sqlite_to_postgres

    kind, _, path = source.partition(":")
    if kind != "sqlite" or not path:
        fail("--from: expected sqlite:PATH")
    if (target is None) == (to_dsn_file is None):
        fail("give the target as --to postgresql://... or --to-dsn-file FILE")
    if to_dsn_file is not None:
        try:
            target = Path(to_dsn_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"--to-dsn-file: cannot read {to_dsn_file}: {exc.strerror}")
    assert target is not None
    try:
        config = JournalConfig(type="postgres", dsn=target, schema_name=schema)
    except ValidationError as exc:
        message = str(exc.errors(include_input=False)[0]["msg"]).removeprefix("Value error, ")
        fail(f"--to/--schema: {message}")
    register_secrets(config.secret_values())
    if not Path(path).exists():
        fail(f"--from: no journal at {path}", 1)

    try:
        report, where = anyio.run(lambda: copy_sqlite_to_postgres(
            path, target, schema=schema, replace=replace_target,
            secrets_=tuple(config.secret_values())))
    except JournalLockedError:
        fail(f"a relay is running on {path}: stop it, then copy", 2)
    except JournalError as exc:
        fail(str(exc), 1)
    if report.replaced:
        click.echo(f"emptied the target {where} first (--replace-target)")
    elif report.again:
        click.echo(f"the target {where} already held a copy of this journal: topped up")
    click.echo(f"copied {path} -> {where}:")
    for table, (read, new) in report.tables.items():
        click.echo(f"  {table:<13} {read:>9} in the source, {new:>9} new in the target")
    click.echo(f"  highest seq   {report.high_seq}: new events on the target follow it")


# -- emulators ---------------------------------------------------------------


def _serve_emulator(emulator: Any, host: str, ports: tuple[int, ...], banner: dict[str, Any],
                    start_traffic: Callable[[], None]) -> None:
    """Serve an emulator until SIGINT/SIGTERM (see :func:`relay.emulators.serve.serve`)."""
    from relay.emulators.serve import ListenError, serve

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    try:
        serve(emulator, host, ports, banner, start_traffic, announce=announce)
    except ListenError as exc:
        fail(str(exc))


def _fault_options(command: Callable[..., None]) -> Callable[..., None]:
    """Fault injection and the random seed, the same for every emulator."""
    for option in reversed([
        click.option("--error-ratio", type=float, default=0.0, show_default=True),
        click.option("--malformed-ratio", type=float, default=0.0, show_default=True),
        click.option("--slow-ratio", type=float, default=0.0, show_default=True),
        click.option("--slow-seconds", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=None),
    ]):
        command = option(command)
    return command


@main.group()
def emulate() -> None:
    """Run a provider emulator on loopback (for trying the relay without credentials)."""


@emulate.command("rongcloud")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "ports", type=int, multiple=True, default=[18080], show_default=True,
              help="Repeat for a backup domain on another port.")
@click.option("--app-key", default="demo-app-key", show_default=True)
@click.option("--app-secret", default="demo-app-secret", show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--budget", type=int, default=10, show_default=True,
              help="Requests per second per endpoint; 0 = unlimited.")
@click.option("--retention", type=float, default=10800.0, show_default=True, help="Seconds.")
@click.option("--redelivery", type=float, default=0.0, show_default=True,
              help="Share of served messages served again later.")
@click.option("--rate", type=float, default=0.0, show_default=True, help="New messages/s.")
@click.option("--backlog", type=int, default=0, show_default=True,
              help="Messages queued at start.")
@_fault_options
def emulate_rongcloud(host: str, ports: tuple[int, ...], app_key: str, app_secret: str,
                      batch_size: int, budget: int, retention: float, redelivery: float,
                      rate: float, backlog: int, error_ratio: float, malformed_ratio: float,
                      slow_ratio: float, slow_seconds: float, seed: int | None) -> None:
    """RongCloud high-assurance message routing (rtmsg/*/qrymsg.json)."""
    from relay.emulators.harness import Faults
    from relay.emulators.rongcloud import RongCloudEmulator

    emulator = RongCloudEmulator(
        app_key, app_secret, batch_size=batch_size, budget=budget or None, retention=retention,
        redelivery_ratio=redelivery, seed=seed,
        faults=Faults(error_ratio=error_ratio, malformed_ratio=malformed_ratio,
                      slow_ratio=slow_ratio, slow_seconds=slow_seconds),
    )
    if backlog:
        emulator.generate(backlog)

    _serve_emulator(emulator, host, ports, {"emulator": "rongcloud", "app_key": app_key},
                    lambda: emulator.set_traffic(rate))


@emulate.command("wukongim")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "ports", type=int, multiple=True, default=[15001], show_default=True,
              help="Repeat to serve on more ports.")
@click.option("--token", default=None, help="Manager token required in header 'token'.")
@click.option("--uid", "uids", multiple=True, default=["u1"], show_default=True,
              help="A uid with offline command messages (repeat).")
@click.option("--channel", "channels", multiple=True, default=["g1:2"], show_default=True,
              help="A history channel as ID:TYPE (repeat).")
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="New command messages/s per uid.")
@click.option("--channel-rate", type=float, default=None,
              help="New history messages/s per channel (default: --rate).")
@click.option("--backlog", type=int, default=0, show_default=True,
              help="Messages queued at start, per uid and per channel.")
@click.option("--real-server", is_flag=True,
              help="Behave as a real WuKongIM v2.2.5 server: every server quirk on.")
@click.option("--quirk", "quirk_settings", multiple=True, metavar="NAME[=VALUE]",
              help="Set one server quirk, e.g. limit_bug or conversation_persist_seconds=5 "
                   "(repeat; applied after --real-server).")
@_fault_options
def emulate_wukongim(host: str, ports: tuple[int, ...], token: str | None,
                     uids: tuple[str, ...], channels: tuple[str, ...], rate: float,
                     channel_rate: float | None, backlog: int, real_server: bool,
                     quirk_settings: tuple[str, ...], error_ratio: float,
                     malformed_ratio: float, slow_ratio: float, slow_seconds: float,
                     seed: int | None) -> None:
    """WuKongIM server API (message/sync, message/syncack, channel/messagesync)."""
    from relay.emulators.harness import Faults
    from relay.emulators.wukongim import ServerQuirks, WuKongIMEmulator

    try:
        quirks = ServerQuirks.from_options(real_server, quirk_settings)
    except ValueError as exc:
        fail(f"--quirk: {exc}")

    parsed: list[tuple[str, int]] = []
    for spec in channels:
        name, _, kind = spec.rpartition(":")
        if not name or not kind.isdigit():
            fail(f"--channel {spec!r}: expected ID:TYPE, e.g. g1:2")
        parsed.append((name, int(kind)))
    emulator = WuKongIMEmulator(
        token, uids=list(uids), channels=parsed, seed=seed, quirks=quirks,
        faults=Faults(error_ratio=error_ratio, malformed_ratio=malformed_ratio,
                      slow_ratio=slow_ratio, slow_seconds=slow_seconds),
    )
    if backlog:
        for uid in uids:
            emulator.generate(backlog, uid)
        for channel_id, channel_type in parsed:
            emulator.generate_channel(backlog, channel_id, channel_type)

    _serve_emulator(emulator, host, ports, {
        "emulator": "wukongim", "uids": list(uids),
        "channels": [{"id": c, "type": t} for c, t in parsed],
        "token_required": token is not None, "quirks": quirks.names_on(),
    }, lambda: emulator.set_traffic(rate, channel_rate))


@emulate.command("leancloud")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "ports", type=int, multiple=True, default=[18090], show_default=True,
              help="Repeat to serve on more ports.")
@click.option("--app-id", default="demo-app-id", show_default=True)
@click.option("--master-key", default="demo-master-key", show_default=True)
@click.option("--rate-limit", type=int, default=1800, show_default=True,
              help="Requests per minute before 429s (the commercial default; a development "
                   "app has 120); 0 = none.")
@click.option("--penalty-seconds", type=float, default=60.0, show_default=True,
              help="How long every request is refused once over the limit.")
@click.option("--send-delay", type=float, default=0.0, show_default=True,
              help="Seconds before a message sent through the API shows in history.")
@click.option("--rate", type=float, default=0.0, show_default=True, help="New messages/s.")
@click.option("--backlog", type=int, default=0, show_default=True,
              help="Messages in history at start.")
@click.option("--history", type=int, default=0, show_default=True,
              help="A large application: this many messages of history over years.")
@click.option("--conversations", type=int, default=2000, show_default=True,
              help="Conversations of the --history application.")
@click.option("--chatrooms", type=int, default=100, show_default=True,
              help="Chatrooms of the --history application.")
@click.option("--history-days", type=float, default=3 * 365, show_default=True,
              help="How far back the --history application's first message is.")
@click.option("--poison", type=click.Choice(["nested", "invalid"]), multiple=True,
              help="Add a poison record in the middle of the history (repeatable).")
@click.option("--retry-after", is_flag=True, help="Send Retry-After with 429 answers.")
@_fault_options
def emulate_leancloud(host: str, ports: tuple[int, ...], app_id: str, master_key: str,
                      rate_limit: int, penalty_seconds: float, send_delay: float, rate: float,
                      backlog: int, history: int, conversations: int, chatrooms: int,
                      history_days: float, poison: tuple[str, ...], retry_after: bool,
                      error_ratio: float, malformed_ratio: float,
                      slow_ratio: float, slow_seconds: float, seed: int | None) -> None:
    """LeanCloud IM REST API (history, per-conversation history, conversation lists)."""
    from relay.emulators.harness import Faults
    from relay.emulators.leancloud import LeanCloudEmulator

    emulator = LeanCloudEmulator(
        app_id, master_key, rate_limit_per_minute=rate_limit or None,
        penalty_seconds=penalty_seconds, send_delay=send_delay, seed=seed,
        retry_after=retry_after, keep_served=not history,
        faults=Faults(error_ratio=error_ratio, malformed_ratio=malformed_ratio,
                      slow_ratio=slow_ratio, slow_seconds=slow_seconds),
    )
    if history:
        emulator.load_history(history, conversations=conversations, chatrooms=chatrooms,
                              days=history_days)
    for kind in poison:
        emulator.inject_poison(kind, timestamp_ms=int((time.time() - history_days * 43200)
                                                      * 1000))
    if backlog:
        emulator.generate(backlog)

    _serve_emulator(emulator, host, ports, {"emulator": "leancloud", "app_id": app_id},
                    lambda: emulator.set_traffic(rate))


@main.command()
@click.option("--dir", "directory", default="var/demo", show_default=True,
              help="Where the journal, events and demo configuration go.")
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="Messages per second the emulators generate.")
def demo(directory: str, rate: float) -> None:
    """Emulators + relay + file sink, with no configuration at all, until Ctrl-C."""
    from relay.demo import run_demo

    try:
        run_demo(Path(directory), rate)
    except JournalLockedError as exc:
        fail(str(exc))
