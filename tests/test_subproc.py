"""tests/_subproc.py: a child's whole process group dies on timeout, on an exception and after the
child exits, and a process armed with the parent-death signal dies with its parent."""
import os
import signal
import subprocess
import sys
import time

import pytest

import _subproc

_HERE = os.path.dirname(os.path.abspath(__file__))

# prints the pid of a sleeping grandchild, then sleeps (or exits at once with argv[1] == "exit")
_PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(g.pid, flush=True)\n"
    "if sys.argv[1] == 'sleep':\n"
    "    time.sleep(600)\n"
)


def _gone(pid, wait=20.0):
    """True once pid no longer runs (a zombie waiting for init to reap it counts as gone)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                return True
        except FileNotFoundError:
            return True
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.05)
    return False


def _pids(text):
    return [int(x) for x in text.split()]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def test_timeout_kills_child_and_grandchild():
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        _subproc.run([sys.executable, "-c", _PARENT, "sleep"], timeout=3)
    (grandchild,) = _pids(exc.value.stdout)
    assert _gone(grandchild)


def test_grandchild_does_not_outlive_a_finished_child():
    r = _subproc.run([sys.executable, "-c", _PARENT, "exit"])
    assert r.returncode == 0, r.stderr
    (grandchild,) = _pids(r.stdout)
    assert _gone(grandchild)


def test_exception_in_parent_kills_group(monkeypatch):
    seen = []
    real = subprocess.Popen.communicate

    def interrupted(self, *a, **k):
        if not seen:
            seen.append(self.pid)
            time.sleep(2)   # let the child start its grandchild
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _subproc.run([sys.executable, "-c", _PARENT, "sleep"])
    monkeypatch.setattr(subprocess.Popen, "communicate", real)
    assert _gone(seen[0])
    # the grandchild is in the killed group: nothing with the child's group id remains
    assert _gone_group(seen[0])


def _gone_group(pgid, wait=20.0):
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        live = [p for p in _group_members(pgid) if not _gone(p, wait=0.01)]
        if not live:
            return True
        time.sleep(0.05)
    return False


def _group_members(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == pgid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_parent_death_signal_kills_orphan():
    """A driver started with _subproc.popen starts a worker tied to it with die_with_parent (as a
    compile pool's initializer does); killing the driver alone (not its group) kills the worker."""
    driver = (
        "import os, subprocess, sys, time\n"
        f"sys.path.insert(0, {_HERE!r})\n"
        "import _subproc\n"
        "w = _subproc.popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "                   start_new_session=True)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(600)\n")
    d = _subproc.popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(d.stdout.readline())
        assert not _gone(worker, wait=0.2)
        os.kill(d.pid, signal.SIGKILL)
        d.wait()
        assert _gone(worker)
    finally:
        _subproc.kill_group(d)
        d.wait()


def test_die_with_parent_in_forked_worker():
    code = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {_HERE!r})\n"
        "import _subproc\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"               # out of the group: only the death signal can reach it
        "    _subproc.die_with_parent(parent)\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(600)\n")
    d = _subproc.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(d.stdout.readline())
        time.sleep(0.5)
        assert not _gone(worker, wait=0.2)
        os.kill(d.pid, signal.SIGKILL)
        d.wait()
        assert _gone(worker)
    finally:
        _subproc.kill_group(d)
        d.wait()


def test_popen_refuses_shared_session():
    with pytest.raises(ValueError, match="start_new_session"):
        _subproc.popen([sys.executable, "-c", "pass"], start_new_session=False)
