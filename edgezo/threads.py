"""How many llama.cpp threads fit the machine as it is: the cores this process may use, less those that other
processes keep busy, measured again before every decode.

Why: llama.cpp's worker threads meet at a barrier after every graph node (this build uses OpenMP). When another
runnable process at normal priority takes one of them off its core for a time slice, every node waits for it: one busy
loop made a 2-thread MeZO step 20x slower on 2 cores, where one thread was 1.75x slower than idle (issue 30). So the
engine runs one thread fewer for each core that others keep busy, never fewer than one, and takes the cores back when
the load goes away. llama.cpp's results do not depend on its thread count (tests/test_real_model.py), so this changes
how fast a run is, never what it computes.

The load is the machine's CPU time (/proc/stat) less this process's own (os.times), over the time since the last
reading, so it is measured while the engine itself runs. Time at a positive nice value is not counted, unless this
process runs niced too: such a process yields to ours (bench/busy.py measures it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2, as a container sees its own group
# A core counts as taken when others keep it busy at least this share of the time. Between two and three runnable
# threads on two cores each gets 2/3 of a core: one busy loop against our 2 threads reads ~0.67, and must count.
TAKEN_FROM_SHARE = 0.4
# The shortest interval a reading is taken over: /proc/stat counts in ticks of 10 ms, so 0.1 s on 2 cores is 20 ticks.
MIN_SAMPLE_S = 0.1
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice. guest is inside user; steal
# is time a hypervisor gave another guest, which takes a core from us just like a process does.
_USER, _NICE, _SYSTEM, _IRQ, _SOFTIRQ, _STEAL = 0, 1, 2, 5, 6, 7


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, a container's cpuset), capped by a cgroup v2 CPU
    quota (a container's --cpus) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


@dataclass(frozen=True)
class CpuReading:
    wall_s: float
    machine_busy_s: float  # CPU time of every process on the machine (all cores), as /proc/stat counts it
    own_s: float  # this process's CPU time, all its threads


def read_cpu() -> CpuReading | None:
    """None where /proc/stat cannot be read (macOS; Android since version 8 keeps it from apps)."""
    try:
        with open(PROC_STAT) as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = ticks[_USER] + ticks[_SYSTEM] + ticks[_IRQ] + ticks[_SOFTIRQ] + (ticks[_STEAL] if len(ticks) > _STEAL else 0)
    if os.getpriority(os.PRIO_PROCESS, 0) > 0:  # our own time is counted as nice: count all nice time
        busy += ticks[_NICE]
    own = os.times()
    return CpuReading(time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system)


def others_busy_cores(before: CpuReading, after: CpuReading) -> float:
    """Cores kept busy by other processes between two readings (0.67: two thirds of one core)."""
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / (after.wall_s - before.wall_s))


def threads_for(usable: int, others_busy: float) -> int:
    """One thread fewer than the usable cores for each core others keep busy, at least one."""
    taken = math.floor(others_busy + 1 - TAKEN_FROM_SHARE)
    return max(1, min(usable, usable - taken))


class ThreadGovernor:
    """The thread count for the next decode: the usable cores at first, then, at every `choose()` at least
    MIN_SAMPLE_S after the last reading, what the load since that reading leaves free."""

    def __init__(self, usable: int | None = None, read: Callable[[], CpuReading | None] = read_cpu):
        self.usable = usable or usable_cores()
        self.n_threads = self.usable
        self.others_busy: float | None = None  # the latest reading, for the progress display and doctor
        self._read = read
        self._last = read()

    def choose(self) -> int:
        # the clock first: generation decodes hundreds of times a second, and reading /proc/stat costs ~30 us
        if self._last is None or time.monotonic() - self._last.wall_s < MIN_SAMPLE_S:
            return self.n_threads
        now = self._read()
        if now is None or now.wall_s - self._last.wall_s < MIN_SAMPLE_S:
            return self.n_threads
        self.others_busy = others_busy_cores(self._last, now)
        self._last = now
        self.n_threads = threads_for(self.usable, self.others_busy)
        return self.n_threads


def sample_load(seconds: float = 0.5) -> tuple[float | None, int]:
    """(cores others keep busy over `seconds`, the thread count the engine would choose now); None where unreadable."""
    governor = ThreadGovernor()
    time.sleep(max(seconds, MIN_SAMPLE_S))
    n_threads = governor.choose()
    return governor.others_busy, n_threads



# libgomp's waiting threads spin GOMP_SPINCOUNT times (its default 300,000, ~3 ms) before they sleep. Between two
# decodes of a step the host works for longer than that, so the threads slept, and under a nice-19 loop they then waited
# for the core the loop held: a MeZO step 1.47x its idle time. Spinning 1e8 times (~1 s) kept them on their cores:
# 0.99x (bench/results/busy-nice19.md). Five minutes (OMP_WAIT_POLICY=active) was no faster, and would keep a core
# busy long after a chat's reply.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "100000000"}


def configure_openmp() -> None:
    """Put OPENMP_DEFAULTS in the environment unless the user set OpenMP's wait settings; libgomp reads them once,
    when llama_cpp loads."""
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ.update(OPENMP_DEFAULTS)
