"""Prometheus's own tools (``prometheus``, ``promtool``) for the tests, without a global install.

:func:`ensure_prometheus` returns a directory holding both binaries. In order:

1. ``$RELAY_PROMETHEUS_BIN``, if set (a directory with both binaries);
2. ``promtool`` and ``prometheus`` on ``PATH`` (e.g. an installed Debian package);
3. the cache, ``$RELAY_PROMETHEUS_CACHE/bin`` (default ``~/.cache/im-relay/prometheus/bin``);
4. otherwise Debian's ``prometheus`` package is fetched into the cache::

       apt-get download prometheus            # into a temporary directory
       dpkg-deb -x prometheus_*.deb tree/     # unpack, no dpkg database, no root
       # keep tree/usr/bin/{prometheus,promtool}; drop the rest (web assets, docs)

   ``apt-get download`` needs no root, only the machine's package lists. If those
   are missing (a fresh container), root runs ``apt-get update``; anyone else gets a
   private copy of the lists under the cache (``apt-get -o Dir::State::Lists=...
   update``). The package is a statically built Go program: nothing else is needed.
   It takes a few seconds (19 MB download, ~100 MB unpacked, 2 binaries kept).

The cache is filled through a temporary sibling renamed into place, under a lock,
so concurrent or interrupted runs never see half a cache.

``python -m tests.support.prometheus_tools`` fills the cache and prints the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "prometheus"
BINARIES = ("prometheus", "promtool")
_APT_TIMEOUT = 600.0


class PrometheusToolsUnavailable(RuntimeError):
    """``prometheus``/``promtool`` could not be found or fetched; the message says why."""


def cache_root() -> Path:
    configured = os.environ.get("RELAY_PROMETHEUS_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "im-relay" / "prometheus"


def ensure_prometheus() -> Path:
    """The directory holding working ``prometheus`` and ``promtool`` binaries."""
    explicit = os.environ.get("RELAY_PROMETHEUS_BIN")
    if explicit:
        directory = Path(explicit)
        if not _usable(directory):
            raise PrometheusToolsUnavailable(
                f"RELAY_PROMETHEUS_BIN={explicit} does not hold working prometheus and promtool"
            )
        return directory
    on_path = shutil.which("promtool")
    if on_path and _usable(Path(on_path).parent):
        return Path(on_path).parent
    root = cache_root()
    target = root / "bin"
    if _usable(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _usable(target):  # filled by another process while we waited
            return target
        _fetch_into(root, target)
    if not _usable(target):
        raise PrometheusToolsUnavailable(f"{target}: binaries unpacked but they do not run")
    return target


def promtool() -> Path:
    return ensure_prometheus() / "promtool"


def version() -> str:
    """The cached package's version, or promtool's own version line."""
    stamp = cache_root() / "bin" / "VERSION"
    if stamp.is_file():
        return stamp.read_text().strip()
    result = subprocess.run([str(promtool()), "--version"], capture_output=True, text=True,
                            timeout=30, check=False)
    return (result.stdout or result.stderr).splitlines()[0] if result.returncode == 0 else "?"


def _usable(directory: Path) -> bool:
    for name in BINARIES:
        binary = directory / name
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return False
    try:
        result = subprocess.run([str(directory / "promtool"), "--version"],
                                capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_into(root: Path, target: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PrometheusToolsUnavailable(
                f"promtool is not installed and {tool} is missing, so Debian's {PACKAGE!r}"
                " package cannot be fetched; install it or set RELAY_PROMETHEUS_BIN"
            )
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=root) as scratch:
        work = Path(scratch)
        deb = _download(root, work)
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], "unpacking the package")
        package_version = _run(["dpkg-deb", "-f", str(deb), "Version"],
                               "reading the package version").strip()
        staged = work / "bin"
        staged.mkdir()
        for name in BINARIES:
            source = tree / "usr" / "bin" / name
            if not source.is_file():
                raise PrometheusToolsUnavailable(f"{deb.name} holds no usr/bin/{name}")
            shutil.move(str(source), staged / name)
            (staged / name).chmod(0o755)
        (staged / "VERSION").write_text(f"{PACKAGE} {package_version} (Debian)\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


def _download(root: Path, work: Path) -> Path:
    """``apt-get download prometheus`` into ``work``; refreshes missing package lists once."""
    attempts: list[str] = []
    options: list[str] = []
    for refresh in (None, "system" if os.geteuid() == 0 else "private"):
        if refresh == "system":
            _run(["apt-get", "update", "-qq"], "apt-get update")
        elif refresh == "private":
            options = _private_lists(root)
        result = subprocess.run(["apt-get", *options, "download", PACKAGE], cwd=work,
                                capture_output=True, text=True, timeout=_APT_TIMEOUT,
                                check=False)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if result.returncode == 0 and debs:
            return debs[-1]
        attempts.append(f"apt-get {' '.join([*options, 'download', PACKAGE])}:"
                        f" {(result.stderr or result.stdout).strip()[-500:]}")
    raise PrometheusToolsUnavailable(
        f"cannot fetch Debian's {PACKAGE!r} package:\n" + "\n".join(attempts)
    )


def _private_lists(root: Path) -> list[str]:
    """Package lists of our own, for a user who cannot refresh the system's."""
    lists = root / "apt" / "lists"
    cache = root / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    options = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
    _run(["apt-get", *options, "update", "-qq"], "apt-get update (private package lists)")
    return options


def _run(command: list[str], what: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_APT_TIMEOUT,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrometheusToolsUnavailable(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        raise PrometheusToolsUnavailable(
            f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


if __name__ == "__main__":
    directory = ensure_prometheus()
    print(directory)
    print(version())
