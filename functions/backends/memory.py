"""How many warm workers fit: a memory budget divided by what a worker is measured to cost.

What a worker costs is its PSS (proportional set size, from ``/proc/<pid>/smaps_rollup``): its private pages
plus its share of the pages it shares with the template and the other workers forked from it. The sum of the
PSS of the template and its workers is the memory they really take, so budget / mean PSS is how many fit.
Memory bounds how many functions may be warm; how many requests compute at once is bounded apart, by cores
(``Settings.in_flight_capacity``, the fair queue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BUDGET_SHARE = 0.7
"""Share of the machine's memory (or of the platform's cgroup limit, when lower) warm workers may use by default;
the rest is for the platform, the deploy (prepare) processes, the page cache and the tenants' request peaks."""
INITIAL_WORKER_MB = 48.0
"""What a worker is assumed to cost before any has been measured (a forked worker serving a small model is
~10-40 MB of PSS; a big model's weights come on top)."""
MIN_WORKER_MB = 4.0  # no estimate below this: a few samples of tiny workers must not promise thousands


def machine_memory_mb(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The machine's memory in MiB, or the platform's cgroup memory limit when that is lower."""
    total = 0
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) // 1024
    for limit_file in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw) // (1024 * 1024))
    return total


def pss_mb(pid: int, proc: Path = Path("/proc")) -> float | None:
    """PSS of process PID in MiB; None when it is gone (or unreadable)."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass(frozen=True)
class MemoryState:
    budget_mb: int
    template_mb: float  # PSS of the template (0 without one)
    worker_mb: float  # mean PSS of the measured workers serving a model (or the initial estimate)
    used_mb: float  # sum of the measured PSS of the template and every live worker


def warm_capacity(state: MemoryState, floor: int = 1) -> int:
    """Workers that fit in the budget beside the template, at the measured cost each (at least FLOOR)."""
    per_worker = max(state.worker_mb, MIN_WORKER_MB)
    return max(floor, math.floor((state.budget_mb - state.template_mb) / per_worker))


def default_budget_mb(machine_mb: int, share: float = DEFAULT_BUDGET_SHARE) -> int:
    return int(machine_mb * share)
