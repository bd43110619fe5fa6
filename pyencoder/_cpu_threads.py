"""Intra-op thread count of the plain-torch CPU path, chosen per call and restored afterwards.

Why: torch parallelises each CPU op with OpenMP, and every parallel op ends in a barrier. On a
busy machine (more runnable threads than cores) a barrier waits for a descheduled sibling thread
for a scheduler time slice (milliseconds), and its spinning siblings take CPU from the thread
doing the work. A call made of many small ops then runs 5-50x slower with 2 threads than with 1
(2-core machine, load ~8: banded attention N=1500 0.17-0.18 s with 1 thread vs 2.6-2.9 s with 2;
one ring decode step 1.4 ms vs 21-35 ms). Quiet, 2 threads are ~1.6x faster than 1 on the large
calls, so a fixed choice loses either way: the count is chosen per call.

    with threads_for(flops, device):      # flops: the call's arithmetic, roughly
        ...                               # torch ops of the call

Policy, set by PYENCODER_CPU_THREADS (read at every call):
  auto (default)  n = torch.get_num_threads(). Work below SMALL_FLOPS (~1 ms of one core, where
                  the barriers cost more than the parallel speed-up): 1 thread. Otherwise
                  min(n, cores this process can get), estimated as (idle CPU time of the machine +
                  this process's own CPU time) per second of wall time over the last window of at
                  least WINDOW_S seconds (Linux /proc/stat; before the first window: usable cores
                  minus the 1-minute load average; elsewhere: n).
  torch           never change torch's thread count (the behaviour before this module).
  an integer N    at most N threads (1: single-threaded), no load estimate.
Only ever lowers the count, never raises it: a caller that set 1 thread (or code already running
inside a parallel region, where torch reports 1) is left alone. CUDA tensors, and code being
traced by torch.compile: no effect.

Thread safety: torch.set_num_threads sets the calling thread's OpenMP and MKL counts plus a
process-wide default that another thread reads once, when it first runs a parallel op. The scope
restores both in ``finally``; threads already running keep their own count throughout, but a
thread whose first parallel op falls inside another thread's scope keeps the lowered count, and
the restore writes the calling thread's count into that default: a torch.set_num_threads made
in another thread after this one started is undone for threads started later (torch offers no
way to read the default apart from the calling thread's count). Set the count before starting
threads, or PYENCODER_CPU_THREADS=torch if that matters. Outputs do not depend on the count
beyond fp32 rounding: the ops used here split work over rows and batch entries, not over a
reduction, so they are usually bit-equal, but MKL does not promise bit-equality across thread
counts.

Limits: the load estimate sees the whole machine, not a cgroup CPU quota; it is Linux-only.
"""
import os
import time

import torch

from ._env import env_choice_or_int

SMALL_FLOPS = 2e7
WINDOW_S = 0.25

_probe = {"t": None, "idle": None, "own": None, "avail": None}


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _idle_seconds():
    """Machine-wide idle + iowait CPU seconds since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def available_cores():
    """Estimated cores this process can get now (float), or None when unknown."""
    now = time.monotonic()
    p = _probe
    if p["t"] is not None and now - p["t"] < WINDOW_S and p["avail"] is not None:
        return p["avail"]
    idle, own = _idle_seconds(), time.process_time()
    if idle is None:
        return None
    if p["t"] is None:
        try:
            avail = _usable_cores() - os.getloadavg()[0]
        except (AttributeError, OSError):
            avail = None
    else:
        dt = now - p["t"]
        avail = ((idle - p["idle"]) + (own - p["own"])) / dt if dt > 0 else p["avail"]
    p.update(t=now, idle=idle, own=own, avail=avail)
    return avail


def choose(flops):
    """Thread count for a CPU call of ``flops`` under the current policy and torch setting."""
    # parsed first (cached per raw value): a junk value was ignored while torch ran 1 thread
    policy = env_choice_or_int("PYENCODER_CPU_THREADS", ("auto", "torch"), "auto")
    n = torch.get_num_threads()
    if n <= 1:
        return n
    if policy == "torch":
        return n
    if policy != "auto":
        return min(n, policy)
    if flops < SMALL_FLOPS:
        return 1
    avail = available_cores()
    if avail is None:
        return n
    return max(1, min(n, _usable_cores(), int(avail + 0.25)))


class threads_for:
    """Context manager: run the enclosed CPU ops with ``choose(flops)`` threads, then restore."""

    __slots__ = ("flops", "cpu", "saved")

    def __init__(self, flops, device=None):
        self.flops = flops
        self.cpu = device is None or torch.device(device).type == "cpu"
        self.saved = None

    def __enter__(self):
        if self.cpu and not torch.compiler.is_compiling():
            n = choose(self.flops)
            cur = torch.get_num_threads()
            if n < cur:
                self.saved = cur
                torch.set_num_threads(n)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None
        return False
