"""Install the PostgreSQL server binaries the test suite needs, where they are missing.

``python -m tests.support.postgres_install`` (run by ``make test``, hence by ``.ci/run``):

* binaries found (see :func:`tests.support.postgres.find_bindir`): says where, does nothing;
* missing, and running as root on a machine with ``apt-get``: installs Debian's
  ``postgresql-15`` package (``postgresql`` where the release has no 15), non-interactive,
  without recommends.  The package would create and start a system cluster on port
  5432 that nobody here uses, so ``postgresql-common`` goes in first and its
  ``create_main_cluster`` is turned off before the server package is installed;
* missing, and not root (or no ``apt-get``): says what to install and exits 0, so the
  PostgreSQL tests skip with the reason (under ``CI=true`` they fail).

Exits 1 when an install was attempted and failed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from .postgres import PREFERRED_MAJOR, PostgresToolMissingError, find_bindir, server_version

PACKAGES: Final = (f"postgresql-{PREFERRED_MAJOR}", "postgresql")
CREATECLUSTER_CONF: Final = Path("/etc/postgresql-common/createcluster.conf")
_APT_TIMEOUT_S: Final = 900.0


class InstallError(RuntimeError):
    pass


def _apt(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-q", "-y", *args]
    try:
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=_APT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{' '.join(command)}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise InstallError(f"{' '.join(command)} failed (exit {result.returncode}):\n{output}")


def _candidate(package: str) -> str | None:
    """The version apt would install, or None when the package lists do not have it."""
    result = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True,
                            timeout=120, check=False)
    match = re.search(r"^\s*Candidate:\s*(\S+)", result.stdout, re.MULTILINE)
    return match.group(1) if match and match.group(1) != "(none)" else None


def _choose_package() -> str:
    for refresh in (False, True):
        if refresh:  # a fresh machine may have no package lists yet, or stale ones
            _apt("update")
        for package in PACKAGES:
            if _candidate(package) is not None:
                return package
    raise InstallError(f"apt knows none of {', '.join(PACKAGES)}")


def _no_main_cluster() -> None:
    """``create_main_cluster = false`` in postgresql-common's cluster defaults."""
    text = CREATECLUSTER_CONF.read_text() if CREATECLUSTER_CONF.exists() else ""
    setting = "create_main_cluster = false"
    pattern = re.compile(r"^\s*#?\s*create_main_cluster\s*=.*$", re.MULTILINE)
    updated = pattern.sub(setting, text, count=1) if pattern.search(text) else (
        text + ("" if text.endswith("\n") or not text else "\n") + setting + "\n")
    CREATECLUSTER_CONF.parent.mkdir(parents=True, exist_ok=True)
    CREATECLUSTER_CONF.write_text(updated)


def install() -> str:
    """Install the server package; returns its name."""
    package = _choose_package()
    _apt("install", "--no-install-recommends", "postgresql-common")
    _no_main_cluster()
    _apt("install", "--no-install-recommends", package)
    return package


def main() -> int:
    try:
        bindir = find_bindir()
    except PostgresToolMissingError as missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            print(f"warning: {missing}\n(the PostgreSQL tests will be skipped, or fail under "
                  "CI=true)", file=sys.stderr)
            return 0
        print(f"PostgreSQL server binaries missing: installing Debian's package "
              f"({' or '.join(PACKAGES)}) with apt-get", flush=True)
        try:
            package = install()
            bindir = find_bindir()
        except (InstallError, PostgresToolMissingError, OSError,
                subprocess.TimeoutExpired) as exc:
            print(f"error: installing the PostgreSQL server failed: {exc}", file=sys.stderr)
            return 1
        print(f"installed {package}")
    print(f"PostgreSQL server binaries: {bindir} ({server_version(bindir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
