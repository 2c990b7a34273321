"""The private memory of a server backend, read from ``/proc`` when the server runs on this host.

PostgreSQL has no per-backend memory limit: ``work_mem`` and ``hash_mem_multiplier`` are USERSET,
so one statement of a tenant's transaction can take as much memory as it likes (issue 24, item 5).
The watchdog bounds it from outside, like time: it reads each runtime-role backend's ``RssAnon``
(anonymous resident memory: what the backend allocated for itself, not the shared buffers it
touched) from ``/proc/<pid>/status``. That needs the watchdog on the server's host and in its PID
namespace (the embedded server; a self-hosted server with the watchdog beside it). A remote or
managed server's backends are not visible: :func:`probe_backend_memory` says so, and the
watchdog runs without its ``memory`` rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = ["BackendMemory", "probe_backend_memory"]

_PROC = Path("/proc")
# A backend's start time as the kernel counts it and as PostgreSQL reports it (backend_start) differ
# by the time between fork and the backend's bookkeeping: well under this.
_START_TOLERANCE_S = 2.0


@dataclass(frozen=True)
class BackendMemory:
    """Reads backends' private memory from ``/proc`` (built by :func:`probe_backend_memory`)."""

    proc: Path = _PROC

    def rss_anon_kb(self, pid: int) -> int | None:
        """``RssAnon`` of ``pid`` in kB, or None when the process is gone or unreadable."""
        try:
            with open(self.proc / str(pid) / "status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None


def _boot_time(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def _process_start(proc: Path, pid: int) -> tuple[str, float]:
    """(command name, start time as a Unix time) of ``pid``."""
    stat = (proc / str(pid) / "stat").read_text()
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    start_ticks = int(fields[19])  # field 22 of proc(5), counted after "pid (comm) "
    return name, _boot_time(proc) + start_ticks / os.sysconf("SC_CLK_TCK")


def probe_backend_memory(own_pid: int, own_backend_start: datetime, *,
                         proc: Path = _PROC) -> tuple[BackendMemory | None, str]:
    """Whether this host's ``/proc`` shows the server's backends, judged by the watchdog's own
    backend (``own_pid``, started at ``own_backend_start`` as pg_stat_activity says): it must be a
    ``postgres`` process of this host that started at that time. Returns the reader, or None and
    why not."""
    if not (proc / "self" / "status").exists():
        return None, "this host has no /proc (not Linux)"
    try:
        name, started = _process_start(proc, own_pid)
    except FileNotFoundError:
        return None, (f"the server's backend {own_pid} is not a process of this host: the server runs elsewhere "
                      "(a remote or managed server) or in another PID namespace")
    except (OSError, ValueError, IndexError) as exc:
        return None, f"cannot read /proc/{own_pid}/stat ({exc})"
    if name != "postgres" or abs(started - own_backend_start.timestamp()) > _START_TOLERANCE_S:
        return None, (f"process {own_pid} of this host is not the server's backend {own_pid}: the server runs "
                      "elsewhere (a remote or managed server) or in another PID namespace")
    reader = BackendMemory(proc)
    if reader.rss_anon_kb(own_pid) is None:
        return None, f"/proc/{own_pid}/status is not readable here (hidepid, or another user's process)"
    return reader, "read from /proc/<pid>/status (RssAnon)"
