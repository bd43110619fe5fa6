"""Subprocesses that die with the test that started them.

Every process a test starts runs in its own process group (``start_new_session=True``) and is
tied to its parent's life (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set between fork and exec,
so it survives the exec). ``run`` kills the whole group (the child and everything it forked:
compile pools, pip's build backends, ...) on timeout, KeyboardInterrupt or any other exception,
and also after a normal exit, so that no grandchild outlives the call. ``die_with_parent`` is the
same tie for processes forked inside a driver (call it in a pool's ``initializer``), and
``spawn`` wraps ``torch.multiprocessing.spawn`` so that a failing or interrupted test never leaves
its ranks behind.

Limits: the parent-death signal is Linux-only (elsewhere a daemon thread polls ``os.getppid()``
in ``die_with_parent``; a process started by ``run`` then relies on the group kill alone). A
grandchild that starts its own session escapes the group kill, though not its parent-death signal
if it was set. ``timeout=None`` (the default) means no wall-clock limit: a test on a loaded
machine is never failed for being slow.
"""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl


def die_with_parent(parent=None, sig=signal.SIGKILL):
    """Deliver ``sig`` to the calling process when its parent exits. ``parent`` is the pid the
    caller expects as its parent (default: the current one); if that parent is already gone, the
    signal is delivered now."""
    parent = os.getppid() if parent is None else parent
    armed = False
    if _LINUX:
        try:
            armed = _prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), sig)
        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _preexec(parent):
    prctl = _prctl() if _LINUX else None   # resolved before fork: nothing to import in the child

    def arm():
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:
                os._exit(137)
    return arm


def kill_group(proc):
    """SIGKILL the process group led by ``proc`` (a Popen started with start_new_session=True);
    a group that is already gone is fine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def popen(cmd, **kwargs):
    """subprocess.Popen in a new session, killed when this process exits (Linux)."""
    kwargs.setdefault("start_new_session", True)
    if not kwargs["start_new_session"]:
        raise ValueError("start_new_session must stay True: the group kill relies on it")
    kwargs.setdefault("preexec_fn", _preexec(os.getpid()))
    return subprocess.Popen(cmd, **kwargs)


def run(cmd, *, timeout=None, input=None, check=False, capture_output=True, text=True,
        poll=0.5, **kwargs):
    """Like subprocess.run, but the child runs in its own process group, which is killed on
    timeout (raising subprocess.TimeoutExpired with the output so far), on any exception
    (KeyboardInterrupt included) and once the child has exited (leftover grandchildren).
    ``timeout=None``: no wall-clock limit."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs.setdefault("stdin", subprocess.PIPE)
    proc = popen(cmd, text=text, **kwargs)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                out, err = proc.communicate(input, timeout=poll)
                break
            except subprocess.TimeoutExpired:
                input = None   # sent by the first call; communicate refuses it again
                if proc.poll() is not None:
                    # the child exited but a grandchild still holds its pipes open
                    kill_group(proc)
                if deadline is not None and time.monotonic() > deadline:
                    kill_group(proc)
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    kill_group(proc)
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


def exit_rank():
    """End a spawned rank that finished its work: flush and ``os._exit(0)``. Interpreter
    finalization with gloo's worker threads still alive can abort the process ("terminate called
    without an active exception", SIGABRT; pytorch/pytorch#179291), after the rank has already
    written its results. Call it only on the success path, after ``destroy_process_group``: an
    exception still reaches torch's spawn wrapper and fails the test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, args=(), nprocs=1, poll=1.0):
    """torch.multiprocessing.spawn(fn, args, nprocs) that SIGKILLs every rank still alive when
    the join fails or is interrupted (torch's own parent-death signal only fires when the whole
    test process exits)."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    try:
        while not ctx.join(timeout=poll):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
