"""What ``relay check`` reports: one line per component reached, shared by sources and sinks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckResult:
    """One line of ``relay check``: what was reached and how it went."""

    component: str
    target: str
    ok: bool
    detail: str
    warning: bool = False
