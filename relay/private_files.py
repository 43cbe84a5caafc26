"""Files and folders that hold chat content: owner-only, whatever the umask."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and every missing parent owner-only (0700), whatever the umask.

    ``Path.mkdir(parents=True, mode=...)`` applies the mode to the last folder
    only, and the umask to all of them: parents of chat content came out 0777
    under umask 000. Folders that already exist are left as they are.
    """
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            created.mkdir()
            os.chmod(created, 0o700)
