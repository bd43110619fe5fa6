"""Shared helpers of the benchmark scripts: device naming, environment record, timing, JSON lines,
and a measured memory-bandwidth roofline.

API (keep it small):
    device_slug() -> str             "nvidia-h100-80gb-hbm3", "cpu-x86_64", ...: results folder name
    env_info() -> dict               device, device_name, torch, triton, cuda, python, commit, date,
                                     run_id (one per process: records of one run share it)
    bench(fn, warmup=25, rep=100) -> dict(median_ms, p20_ms, p80_ms)
                                     warmup/rep are milliseconds of running fn (as in
                                     triton.testing.do_bench, which is used on CUDA; on CPU a
                                     perf_counter loop with the same budget, at least 3 runs)
    host_us(fn, calls=20, repeats=5, budget_ms=200) -> float
                                     host-side cost of one call in us: ``calls`` calls back to
                                     back with time.perf_counter, no synchronisation inside the
                                     loop (CUDA: synchronised before and after, the final
                                     synchronize inside the timing), median over ``repeats``
                                     (fewer calls when calls x repeats would pass budget_ms). When
                                     the kernel is slower than the host this measures the GPU:
                                     compare with bench()'s figure
    graph_ms(fn, warmup=25, rep=100) -> float | None
                                     fn captured once into a torch.cuda.CUDAGraph (3 warm-up calls
                                     on a side stream first) and the replay timed with bench():
                                     median ms of GPU time without host overhead. None on CPU;
                                     raises what the capture raises
    host_graph_fields(fn, prefix="fwd") -> dict
                                     {prefix_host_us, prefix_graph_ms} (both None on CPU); a
                                     failed capture gives prefix_graph_ms None and
                                     prefix_graph_error (the exception's first line), never raises
    results_dir() -> str             <results root>/<device-slug>: where this run writes
    write_jsonl(name, records) -> path
                                     appends records (env_info() merged in, record keys win) to
                                     <results root>/<device-slug>/<name>.jsonl (opened,
                                     written and closed per call: a row is on disk when it returns)
    JsonlRows(name, write=True, extra=None)
                                     a list of records that appends each record to <name>.jsonl
                                     (write_jsonl, ``extra`` merged in) the moment it is added
                                     (append, extend, +=): a benchmark killed by its time box
                                     (SIGTERM/SIGKILL) keeps every row it finished; ``.path`` is
                                     the file (None until a row is written), ``write=False`` keeps
                                     rows in memory only (--no-write, dry runs)

Results root: $PYENCODER_RESULTS_DIR when set, else <repo>/bench-results/ (git-ignored), so a run
never touches tracked files. Committing measured results is explicit: `python -m benchmarks
--commit-results` (or PYENCODER_RESULTS_DIR=benchmarks/results) writes into the committed
benchmarks/results/ that `python -m benchmarks.readme` renders.
    copy_bandwidth_gbs() -> float    measured device copy bandwidth, GB/s of (read + write) bytes;
                                     the roofline for memory-bound kernels (cached per process)
"""
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMITTED_RESULTS = os.path.join(HERE, "results")
DEFAULT_RESULTS = os.path.join(ROOT, "bench-results")


def results_root():
    return os.environ.get("PYENCODER_RESULTS_DIR") or DEFAULT_RESULTS


def results_dir():
    return os.path.join(results_root(), device_slug())


def _slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def device_slug():
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return _slug(f"cpu-{platform.machine() or 'unknown'}")


def _commit():
    # PYENCODER_COMMIT: set by the device call (the transfer carries the tree, not its git
    # metadata, so git there would describe another commit)
    if os.environ.get("PYENCODER_COMMIT"):
        return os.environ["PYENCODER_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        # results files written by the run itself do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def env_info():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = _commit()
    return {
        "device": device_slug(),
        "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor()
                                                                   or platform.machine()),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": commit,
        "date": now.isoformat(timespec="seconds"),
        "run_id": f"{now.strftime('%Y%m%dT%H%M%S')}-{commit or 'nocommit'}",
    }


def _quantile(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def bench(fn, warmup=25, rep=100):
    """Median and 20/80 % quantiles of fn's run time in ms."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80)}
    t_end = time.perf_counter() + warmup / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": _quantile(times, 0.5), "p20_ms": _quantile(times, 0.2),
            "p80_ms": _quantile(times, 0.8)}


def host_us(fn, calls=20, repeats=5, budget_ms=200.0):
    """Median over ``repeats`` of (wall time of ``calls`` back-to-back calls) / calls, in us.
    CUDA: synchronised before the loop and once after it (inside the timing), never inside, so
    with ``calls`` small enough not to fill the launch queue a host-bound fn measures the host.
    A slow fn (one synchronised call x calls x repeats over ``budget_ms``) gets fewer calls per
    repeat (at least 1): there the figure is GPU time anyway, and a table stays in its time box."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-9)
    calls = max(1, min(calls, int(budget_ms / 1e3 / one / max(1, repeats))))
    ts = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        ts.append((time.perf_counter() - t0) / calls * 1e6)
    ts.sort()
    return float(_quantile(ts, 0.5))


def graph_ms(fn, warmup=25, rep=100):
    """Median ms of replaying fn captured into a CUDA graph (pure GPU time); None without CUDA.
    fn's inputs must be static tensors (the graph replays on the same memory)."""
    if not torch.cuda.is_available():
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    try:
        return float(bench(g.replay, warmup, rep)["median_ms"])
    finally:
        del g


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def host_graph_fields(fn, prefix="fwd", warmup=25, rep=100):
    """The host and CUDA-graph figures of fn as record fields (None on CPU). A failed capture is
    recorded (``<prefix>_graph_error``), never raised: the case goes on."""
    out = {f"{prefix}_host_us": None, f"{prefix}_graph_ms": None}
    if not torch.cuda.is_available():
        return out
    out[f"{prefix}_host_us"] = host_us(fn)
    try:
        out[f"{prefix}_graph_ms"] = graph_ms(fn, warmup, rep)
    except Exception as e:  # capture unsupported by this provider (host sync, allocation, ...)
        out[f"{prefix}_graph_error"] = _first_line(e)
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
    return out


def host_graph_text(rec, prefix="fwd"):
    """"  host 123 us  graph 0.045 ms" for a record with these fields ("" when both are None)."""
    h, g = rec.get(f"{prefix}_host_us"), rec.get(f"{prefix}_graph_ms")
    if h is None and g is None and f"{prefix}_graph_error" not in rec:
        return ""
    text = f"  host {h:.0f} us" if h is not None else ""
    if g is not None:
        text += f"  graph {g:.3f} ms"
    elif f"{prefix}_graph_error" in rec:
        text += "  graph failed"
    return text


def wall_times(fn, reps=3, warm=True):
    """(median, min, max) wall seconds of ``reps`` calls of fn after one warm-up call: for
    whole-model runs too long for ``bench``'s time budget."""
    if warm:
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return _quantile(ts, 0.5), ts[0], ts[-1]


def write_jsonl(name, records):
    folder = results_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    env = env_info()
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({**env, **r}, sort_keys=False) + "\n")
    return path


class JsonlRows(list):
    """Records kept in a list and appended to ``<name>.jsonl`` one by one as they are added."""

    def __init__(self, name, write=True, extra=None):
        super().__init__()
        self.name, self.write, self.extra, self.path = name, write, dict(extra or {}), None

    def _out(self, rec):
        if self.write:
            self.path = write_jsonl(self.name, [{**rec, **self.extra}])

    def append(self, rec):
        super().append(rec)
        self._out(rec)

    def extend(self, recs):
        for r in recs:
            self.append(r)

    def __iadd__(self, recs):
        self.extend(recs)
        return self


@functools.lru_cache(maxsize=1)
def copy_bandwidth_gbs():
    """Device-to-device copy of a large buffer; bytes moved = 2 x size (read + write)."""
    if torch.cuda.is_available():
        n = 1 << 28  # 1 GiB of float32
        src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), warmup=50, rep=200)["median_ms"]
        del src, dst
        torch.cuda.empty_cache()
    else:
        n = 1 << 25  # 128 MiB
        src = torch.rand(n)
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), warmup=20, rep=200)["median_ms"]
    return 2 * n * 4 / (t * 1e-3) / 1e9


@contextlib.contextmanager
def temp_env(**values):
    """Environment variables set for the duration of the block, then restored (unset again
    where they were unset)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
