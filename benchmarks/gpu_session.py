"""The one GPU call: validate and measure every kernel inside a fixed time budget, streaming logs
and results into $OUT after every stage so that a call cut short still returns what finished.

    python -m benchmarks.gpu_session [--budget 480] [--dry-run] [--out DIR] [--stages S ...]
                                     [--autotune] [--list]

Stages, in order of value (name: timeout in s on a GPU):
  1. setup (~20-40 s; capped at 150, room to build the extension there): install the carried
     wheels from .whl/ into <work>/site (PYTHONPATH), install pyencoder editable, load the carried prebuilt
     pyencoder._C from .prebuilt/ when its build_info.json matches the device's torch, CUDA and
     csrc/ (else build it there with 16 jobs), install the carried Triton cache .triton-cache/
     into <work>/triton-cache (TRITON_CACHE_DIR of every stage) and compare its key facts with
     the device's Triton ("cache key matches" or "mismatch: compiling"; benchmarks/triton_cache.py),
     then the device compiles of earlier calls it carries (.triton-cache/device/: Triton entries
     there too, Inductor's FX graph / AOTAutograd files into <work>/inductor-cache,
     TORCHINDUCTOR_CACHE_DIR of every stage),
     `python -m pyencoder info`, versions, GPU name and measured copy bandwidth;
  2. profile (25): benchmarks.profile_attention, where one attention call's time goes (host
     launch path vs kernels: torch.profiler, per-call host time by Python function, CUDA-graph
     replay), then benchmarks.bench_dispatch_overhead (CPU tensors, stand-in launches: the
     device CPU's speed on the host path, against this repository's CPU machine);
  3. attention_table (150): bench_attention at wav2vec2-base (B=8, H=12, D=64), bf16, the four
     headline masks (TABLE_MASKS), fwd, bwd, fwd+bwd (+ host time and graph forward time):
     pyencoder-triton in its three RoPE modes at N = 1500, 3000, then Flex at N=1500 (RoPE off),
     a tuning run (--autotune full, TUNE_N), Flex with RoPE, sdpa-mask and flash-attn, Flex at
     N=3000, ours under torch.compile (pyencoder-triton-compiled, N=1500), Flex at N=3000 with
     RoPE (every process
     appends each JSON line as it is measured);
  4. streaming (50): bench_streaming --gpu --quick --max-seconds 20 (step p50/p99 at batch 1
     for 20 and 80 ms chunks and the step's kernel profile, graph replay and eager; then the
     concurrent real-time streams, from batch 2048 to 1/8, no new measurement after 20 s), then
     `pytest -m gpu_quick` on the decode kernel, fused ring write and CUDA-graph step tests,
     then bench_running_norm --quick (the extractor norms' kernels vs the torch paths);
  5. conv (40): bench_conv --quick --max-seconds 14 (depthwise L=16384 then 2048 vs
     F.conv1d(groups=C), strided, update, grouped), then `pytest -m gpu_quick` on
     tests/test_conv_cudnn_path.py and tests/test_conv_gpu.py, then with what is left the grouped
     conv's tile / layout A/B (CONV_GRP_AB_ARGS);
  6. attention_ext (55): bench_attention_ext, one process per suite (bias, sink, frame; each
     stops starting cases after its --max-seconds share and appends its JSON lines after every
     case): the fused WavLM relative bias vs Flex's score_mod and the plain-torch path, sink keys
     and frame-rate cross-attention vs Flex's mask_mod, bf16, N = 1500 first (every provider
     checked against the float32 reference before it is timed);
  7. attention (70): `pytest -m gpu_quick` on the attention tests, bf16 first (the bf16 ids run
     before the rest), with pytest-xdist (-n 16) when installed;
  8. convnext_hf (50): `pytest -m gpu_quick` on the fused ConvNeXt and model tests, bench_hf
     --quick (the HF patch offline vs transformers' SDPA and eager, in that order), bench_convnext
     --quick (fused vs composed, offline and streaming steps);
  9. rest (what is left): `python -m pyencoder demo --quick` (the main job on the GPU), then
     `pytest -m "gpu and not gpu_quick"`.
(Benchmarks first: on the first GPU call the tests mostly passed while no benchmark row was
written; benchmarks/GPU_SESSION.md.)
Budget arithmetic: a typical setup (SETUP_TYPICAL_S = 40 s) plus every other stage's timeout but
rest's fits the default budget (480 s); tests/test_gpu_session.py checks it.
A stage runs only while the total budget lasts; each command of a stage runs in its own process
group, killed as a group (SIGTERM, then SIGKILL) when the stage's time or the budget runs out.
The Triton autotuner is pinned (PYENCODER_TRITON_AUTOTUNE=0: one compile per kernel variant)
unless --autotune. Every stage records in summary.json the Triton cache entries it added
(`triton_cache_new`, by kernel name): each is a compile, i.e. a miss of the carried cache (the
entries setup installed, device/'s included, count as carried).

$OUT (at most 8 files come back, 16 MiB each, names [A-Za-z0-9._-]; this writes 5):
  session.log                  this driver's log, each stage's log appended (capped per stage)
  summary.json                 per stage: status (ok, failed, timeout, skipped), rc per command,
                               seconds; setup facts (versions, GPU, copy bandwidth, extension)
  logs.tgz                     every stage's full log and pytest junit XML
  results-<device-slug>.tgz    the benchmark JSON lines, <device-slug>/<name>.jsonl
                               (PYENCODER_RESULTS_DIR=<work>/results for every stage)
  device-cache.tgz             what this call compiled, for the next call to carry (merge it:
                               python -m benchmarks.triton_cache merge): the Triton entries not
                               carried (pruned copies), Inductor's new FX graph / AOTAutograd
                               files, device_cache_info.json (key facts, GPU, torch, run, counts);
                               written only when one of them changed since the last pack (the
                               seconds it took are logged), at most 15 MiB (largest entries
                               dropped first, logged)
All five are rewritten after every stage (device-cache.tgz only on change). Exit status: 0 when
every stage that ran passed.

--dry-run rehearses the same stages, time boxes and $OUT layout on a CPU machine (~90
CPU-seconds, 1.5-5 min on a shared 2-core VM; --timeout-scale for slow machines):
TRITON_INTERPRET=1, tiny shapes, the same pytest selections collected only (plus one attention
test in the interpreter), benchmarks in their CPU or --dry-run forms, the extension's install
logged as what the device would do. tests/test_gpu_session.py runs it in CI.
"""
import argparse
import collections
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_FILE_LIMIT = 16 * 2**20
STAGE_LOG_CAP = 2 * 2**20          # per stage, in session.log (the full log is in logs.tgz)
SESSION_LOG_CAP = 12 * 2**20       # session.log in all (a file over OUT_FILE_LIMIT never comes back)
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")

ATTENTION_TESTS = ["tests/test_attention_triton.py", "tests/test_attention_triton_ropetable.py",
                   "tests/test_attention_triton_prerot.py",
                   "tests/test_attention_sink.py", "tests/test_attention_sink_bias.py",
                   "tests/test_attention_lse_grad.py",
                   "tests/test_call_programs_gpu.py"]
STREAMING_TESTS = ["tests/test_streaming_decode_triton.py", "tests/test_streaming_fixed.py",
                   "tests/test_wavlm_step_fixed.py", "tests/test_streaming_fixed_sink.py",
                   "tests/test_ring_write_fused.py", "tests/test_encoder_step_fixed.py",
                   "tests/test_running_norm_triton.py", "tests/test_cuda_graph_step.py",
                   "tests/test_stack_dispatch.py", "tests/test_admit.py",
                   "tests/test_channel_norm_triton.py"]
# no new bench_streaming search measurement after this (the c446fb01b9e0 call's bench took 45.9
# of the stage's 50 s, searching to 1/32 from batch 256, and cut the tests off after 4.1 s)
STREAM_BENCH_MAX_S = 20
CONV_TESTS = ["tests/test_conv_cudnn_path.py", "tests/test_conv_gpu.py"]
CONV_BENCH_MAX_S = 14   # no new bench_conv case after this (the case running then finishes)
# The conv stage's last command, with what the stage has left: the positional conv's forward in
# the implicit-GEMM variants (bench_conv.GRP_VARIANTS: tiles, tap-major reduction) and in the
# layout a model gives it (channel-last), beside cuDNN. On the H100 the default tile ran C=768 at 7.3x cuDNN but C=1024 at
# 0.68x, and channel-last input was never timed. The Triton cache build captures these launches.
CONV_GRP_AB_ARGS = ["--quick", "--suites", "grouped", "--layouts", "cl", "cf", "--grp-tiles",
                    "--providers", "pyencoder-triton", "cudnn"]
CONVNEXT_TESTS = ["tests/test_convnext_fused.py", "tests/test_models.py"]
# bench_convnext --tiles in the convnext_hf stage: the fused kernel at 8 and 16 time rows a program
# (its default holds 4 rows of C=768 padded to 1024 lanes, rereading a 6-row halo per 4 rows; it
# ran at 0.61-0.63x the composed ops on the H100); the cache build captures them
CONVNEXT_TILES = ["8192x8", "16384x16"]
BF16_K = "bfloat16 or long_sequences or deterministic_bitwise"   # the attention tests in bf16
ATTENTION_TABLE_NS = ("1500", "3000")     # the attention_table stage's N (12000: a second call)
EXT_SUITES = {"bias": 15, "sink": 8, "frame": 8}   # bench_attention_ext: suite -> --max-seconds


def triton_cache_entries(cache_dir):
    """{entry folder: kernel name} of a Triton cache folder (benchmarks/triton_cache.entries)."""
    from benchmarks.triton_cache import entries
    return entries(cache_dir)


def csrc_hash(csrc=os.path.join(ROOT, "csrc")):
    """sha256 over csrc/'s relative file names and contents: which sources a prebuilt .so is of."""
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.isfile(f):
            h.update(os.path.relpath(f, csrc).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def prebuilt_mismatch(info, torch_version, cuda_version, source_hash):
    """None when a prebuilt extension described by build_info.json `info` fits this torch, CUDA
    and csrc/ tree, else the reason (a readable sentence)."""
    if not isinstance(info, dict) or not info.get("cuda_built"):
        return "no prebuilt extension (.prebuilt/build_info.json missing or not a CUDA build)"
    if info.get("torch") != torch_version:
        return f"prebuilt for torch {info.get('torch')}, this is torch {torch_version}"
    if info.get("cuda") != cuda_version:
        return f"prebuilt for CUDA {info.get('cuda')}, this torch has CUDA {cuda_version}"
    if info.get("csrc_sha256") != source_hash:
        return "csrc/ changed since the extension was prebuilt (make gpu-prep)"
    return None


# ------------------------------------------------------------------------------------------------
# Stage plans: lists of (label, argv, extra env)
# ------------------------------------------------------------------------------------------------

def _py(*args):
    return [sys.executable, *args]


def _pytest(marker, files, ctx, junit, extra=()):
    # -v: one line per finished test, so a stage killed at its timeout still logs what passed
    cmd = _py("-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "-rfE",
              "--durations=15",
              "-m", marker, f"--junitxml={os.path.join(ctx['logdir'], junit)}", *extra, *files)
    if ctx["xdist"] and not ctx["dry"]:
        cmd[3:3] = ["-n", str(ctx["workers"])]
    if ctx["dry"]:
        cmd.append("--collect-only")
    return cmd


# A gpu_quick / gpu pytest command that fails reruns its failed tests (at most RERUN_MAX, within
# the stage's time) with PYENCODER_FAST_LAUNCH=0: the fast launch path (pyencoder.ops._triton_op)
# is checked on the CPU only against stand-in compiled kernels, so a test that fails with it and
# passes without it names it, not the kernel (summary: the command's "fast_launch_rerun").
RERUN_MAX = 24


def junit_cases(junit):
    """[(node id, status)] of a pytest junit XML file, status "passed", "failed" (failure or
    error) or "skipped"; [] when it is missing or unreadable. Node ids as pytest writes them
    (``tests/test_x.py::TestClass::test_y[param]``): junit's classname is the dotted module path
    followed by any test classes (CamelCase, pytest's convention)."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        parts = (case.get("classname") or "").split(".")
        k = len(parts)
        while k > 1 and parts[k - 1][:1].isupper():
            k -= 1
        node = "/".join(parts[:k]) + ".py::" + "::".join(parts[k:] + [case.get("name") or ""])
        status = ("failed" if case.find("failure") is not None or case.find("error") is not None
                  else "skipped" if case.find("skipped") is not None else "passed")
        out.append((node, status))
    return out


def failed_tests(junit):
    """Node ids of the failed or erroring test cases of a junit XML file, each once."""
    return list(dict.fromkeys(n for n, st in junit_cases(junit) if st == "failed"))


def rerun_command(argv, ids, junit):
    """The pytest command ``argv`` narrowed to the node ids ``ids`` (its -m / -k / -n / file
    arguments dropped), junit XML to ``junit``."""
    i = argv.index("pytest")
    head = argv[:i + 1]
    keep, rest = [], list(argv[i + 1:])
    while rest:
        a = rest.pop(0)
        if a in ("-m", "-k", "-n"):         # the selection: the node ids replace it
            rest.pop(0)
        elif a == "-p":                     # a plugin switch, kept with its value
            keep += [a, rest.pop(0)]
        elif a.startswith("-") and not a.startswith("--junitxml="):
            keep.append(a)
    return head + keep + [f"--junitxml={junit}"] + list(ids)


def plan_setup(ctx):
    cmds = []
    whl = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if whl:
        cmds.append(("wheels", _py("-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                   ctx["site"], *whl), {}))
    if not ctx["dry"]:
        cmds.append(("install", _py("-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                    "--no-build-isolation", "-e", ROOT),
                     {"PYENCODER_BUILD_CUDA": "0"}))
    cmds.append(("extension", _py("-m", "benchmarks.gpu_session", "--_setup-extension",
                                  "--out", ctx["work"]) + (["--dry-run"] if ctx["dry"] else []),
                 {}))
    cmds.append(("triton-cache", _py("-m", "benchmarks.gpu_session", "--_triton-cache", "--out",
                                     ctx["work"], "--triton-cache", ctx["triton_cache"]), {}))
    cmds.append(("info", _py("-m", "pyencoder", "info"), {}))
    cmds.append(("facts", _py("-m", "benchmarks.gpu_session", "--_facts", "--out", ctx["work"]),
                 {}))
    return cmds


def plan_attention(ctx):
    if ctx["dry"]:
        return [("pytest-collect", _pytest("gpu_quick", ATTENTION_TESTS, ctx, "attention.xml"), {}),
                ("interpreter", _py("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                    "tests/test_attention_triton.py", "-k",
                                    "test_fp32_forward_backward and N33x33"), {})]
    return [("pytest-bf16", _pytest("gpu_quick", ATTENTION_TESTS, ctx, "attention_bf16.xml",
                                    ("-k", BF16_K)), {}),
            ("pytest-rest", _pytest("gpu_quick", ATTENTION_TESTS, ctx, "attention_rest.xml",
                                    ("-k", f"not ({BF16_K})")), {})]


# the attention_table stage's masks (bench_attention --masks): the four headline masks
TABLE_MASKS = ("band:None:0", "band:250:3", "band:50:3", "chunked:4:128:3")
ROPE_PROVIDERS = ("pyencoder-triton", "pyencoder-triton-prerot", "pyencoder-triton-ropetable")
TUNE_N = "1500"     # the attention_table stage's autotuned run (bench_attention --autotune full)
# the A/B of an untimed kernel flag (bench_attention's KERNEL_VARIANTS: PYENCODER_PIPELINE_MASKED)
PIPE_PROVIDER, PIPE_N = "pyencoder-triton-pipe", "1500"


def plan_profile(ctx):
    """Where the time of one attention call goes: host (launch path) vs kernel (profiler, CUDA
    graph replay): the ~0.3 ms per-call floor the first session's logs showed."""
    if ctx["dry"]:
        # one case (its rows and tables: tests/test_bench_profile_attention.py runs them all)
        return [("profile-attention", _py("-m", "benchmarks.profile_attention", "--dry-run",
                                          "--max-seconds", "0"), {})]
    # then the CPU-only host microbenchmark this repository's CPU machine also runs (stand-in
    # launches and driver, CPU tensors): the same Python path timed on both machines says how
    # much of the device's host time is its CPU (the H100 call measured 250-360 us per forward
    # against ~85 us for that path here)
    return [("profile-attention", _py("-m", "benchmarks.profile_attention", "--max-seconds",
                                      "16"), {}),
            ("dispatch-overhead", _py("-m", "benchmarks.bench_dispatch_overhead", "--calls",
                                      "1000"), {})]


def plan_attention_table(ctx):
    if ctx["dry"]:
        # a band and a chunked mask (the benchmark itself: tests/test_bench_attention.py)
        return [("bench-attention", _py("-m", "benchmarks.bench_attention", "--n", "48",
                                        "--masks", "band:50:3", "chunked:4:128:3",
                                        "--providers", "reference", "sdpa-mask"), {})]
    # every process appends each JSON line as it is measured; ours first (three RoPE modes, the
    # RoPE-off rows once), then Flex (one compile per (N, RoPE): its masks share one graph,
    # bench_attention.flex_mask_mod; attention-only rows first), then SDPA
    masks = ("--masks", *TABLE_MASKS)
    runs = [("triton", ["--providers", *ROPE_PROVIDERS, "--n", *ATTENTION_TABLE_NS]),
            ("flex-N1500-norope", ["--providers", "flex", "--n", "1500", "--rope", "off"]),
            # the boundary-block loops pipelined (off by default until this row times it)
            ("pipe", ["--providers", PIPE_PROVIDER, "--n", PIPE_N]),
            # every tile of the pruned autotune lists timed (compiles carried in the Triton
            # cache): which tile wins per window, to rank the default table
            ("tune", ["--providers", "pyencoder-triton", "--n", TUNE_N, "--rope", "off",
                      "--autotune", "full"]),
            ("flex-N1500-rope", ["--providers", "flex", "--n", "1500", "--rope", "on"]),
            ("sdpa-flash", ["--providers", "sdpa-mask", "flash-attn", "--n", "1500"]),
            ("flex-N3000-norope", ["--providers", "flex", "--n", "3000", "--rope", "off"]),
            # ours under torch.compile (Inductor launches our kernels: the host path of a
            # compiled model, against Flex's); Inductor compiles our kernels on the device, so
            # this runs last (the device cache brings those compiles back for the next call)
            ("compiled", ["--providers", "pyencoder-triton-compiled", "--n", "1500"]),
            # with what is left (one Flex compile per run since the masks share a graph)
            ("flex-N3000-rope", ["--providers", "flex", "--n", "3000", "--rope", "on"])]
    return [(f"bench-attention-{label}", _py("-m", "benchmarks.bench_attention", "--shapes",
                                             "wav2vec2-base", *masks, *extra), {})
            for label, extra in runs]


def plan_conv(ctx):
    # The benchmark first (the gpu_quick conv tests all passed on the first GPU, 71 / 71), capped
    # so the tests keep their share of the 40 s: on the second GPU call bench_conv --quick took
    # 23.4 s (process start, compiles, then ~50 rows) and cut the tests off at 16.8 s. The quick
    # rows run most valuable first (depthwise L=16384 for cuda / triton / cudnn: 6 rows of a
    # 400 MB working set, ~0.5 s each with the host and graph figures, ~3 s added; then L=2048;
    # then the strided rows, the cudnn-kind fix's before / after; then update, grouped)
    # and --max-seconds CONV_BENCH_MAX_S starts no case after that. The cudnn-kind tests first.
    bench = ["--quick", "--max-seconds", str(CONV_BENCH_MAX_S)] if not ctx["dry"] else \
        ["--quick", "--suites", "depthwise", "update"]
    ab = CONV_GRP_AB_ARGS if not ctx["dry"] else \
        ["--suites", "grouped", "--layouts", "cf", "cl", "--grp-tiles", "--providers",
         "torch-conv1d"]
    return [("bench-conv", _py("-m", "benchmarks.bench_conv", *bench), {}),
            ("pytest", _pytest("gpu_quick", CONV_TESTS, ctx, "conv.xml"), {}),
            ("bench-conv-grouped-ab", _py("-m", "benchmarks.bench_conv", *ab), {})]


def plan_streaming(ctx):
    # the benchmark first (batch-1 latency and its kernel profile always run; the streams search
    # is capped so the tests keep their share), then the tests: on the first GPU call they alone
    # filled the stage (16 of 19 passed), on the second the uncapped bench did
    bench = ["--dry-run"] if ctx["dry"] else ["--gpu", "--quick", "--max-seconds",
                                              str(STREAM_BENCH_MAX_S)]
    # last, with what is left: the running GroupNorm's kernel against the torch path it replaced
    # (after the tests, which check it compiled first)
    rn = ["--dry-run"] if ctx["dry"] else ["--quick"]
    return [("bench-streaming", _py("-m", "benchmarks.bench_streaming", *bench), {}),
            ("pytest", _pytest("gpu_quick", STREAMING_TESTS, ctx, "streaming.xml"), {}),
            ("bench-running-norm", _py("-m", "benchmarks.bench_running_norm", *rn), {})]


def plan_convnext_hf(ctx):
    hf = ["--quick"] if not ctx["dry"] else ["--seconds", "1", "--steps", "2", "--warm-seconds",
                                             "0.2", "--providers", "pyencoder"]
    # bench_hf before bench_convnext: the HF patch has never been timed on a GPU (the
    # c446fb01b9e0 call cut it after 9.6 s, before its first row), while bench_convnext's rows
    # already decided ConvNeXtBlock's default (composed); bench_hf runs ours, then SDPA, then eager
    return [("pytest", _pytest("gpu_quick", CONVNEXT_TESTS, ctx, "convnext.xml"), {}),
            ("bench-hf", _py("-m", "benchmarks.bench_hf", *hf), {}),
            ("bench-convnext", _py("-m", "benchmarks.bench_convnext", "--quick", "--tiles",
                                   *CONVNEXT_TILES), {})]


def plan_attention_ext(ctx):
    # one process per suite (each appends its JSON lines after every case), the headline (the
    # fused bias vs Flex's score_mod) first; --max-seconds: no new case after that many seconds,
    # so the suites share the stage (the first case of each, compiles included, always runs)
    if ctx["dry"]:
        return [(f"bench-ext-{s}", _py("-m", "benchmarks.bench_attention_ext", "--dry-run",
                                       "--suites", s), {}) for s in EXT_SUITES]
    return [(f"bench-ext-{s}", _py("-m", "benchmarks.bench_attention_ext", "--suites", s,
                                   "--max-seconds", str(t)), {}) for s, t in EXT_SUITES.items()]


def plan_rest(ctx):
    files = ATTENTION_TESTS + ["tests/test_conv_gpu.py"] if ctx["dry"] else ["tests"]
    # the README's main job first (a user's first command on a GPU machine: the clip streamed on
    # the GPU, its steady step one CUDA graph, equal to offline; never run on a GPU yet); not in
    # the dry run (tests/test_demo.py covers its graph path's logic on the CPU)
    demo = [] if ctx["dry"] else [("demo", _py("-m", "pyencoder", "demo", "--quick"), {})]
    return demo + [("pytest", _pytest("gpu and not gpu_quick", files, ctx, "rest.xml"), {})]


# (name, GPU timeout s, dry-run timeout s, plan)
STAGES = [
    ("setup", 150, 60, plan_setup),     # ~20-40 s with a fitting prebuilt _C
    ("profile", 25, 40, plan_profile),
    ("attention_table", 150, 40, plan_attention_table),
    ("streaming", 50, 40, plan_streaming),
    ("conv", 40, 40, plan_conv),
    ("attention_ext", 55, 40, plan_attention_ext),
    ("attention", 70, 60, plan_attention),
    ("convnext_hf", 50, 60, plan_convnext_hf),
    ("rest", 10**6, 40, plan_rest),
]
MIN_STAGE_S = 10
SETUP_TYPICAL_S = 40   # setup with a fitting prebuilt _C (20-40 s): the budget arithmetic's term


# ------------------------------------------------------------------------------------------------
# Running with process-group timeouts
# ------------------------------------------------------------------------------------------------

def run_group(argv, env, log, timeout):
    """Run argv in its own process group, output appended to the open file `log`; when `timeout`
    seconds pass, SIGTERM the whole group, then SIGKILL it 5 s later. Whatever the group left
    running after its leader exits is killed too. Returns (returncode or None on timeout, s)."""
    t0 = time.monotonic()
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = p.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        rc = None
        _killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _killpg(p.pid, signal.SIGKILL)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:   # stuck in the driver (D state): the session goes on
        log.write("[the process outlived SIGKILL by 10 s: left behind]\n")
    dt = time.monotonic() - t0
    log.write(f"[{'timeout' if rc is None else f'exit {rc}'} after {dt:.1f} s]\n")
    log.flush()
    return rc, dt


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Session:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or "/tmp/pyencoder-gpu-out")
        self.work = os.path.abspath(args.work or os.path.join(
            "/tmp", "pyencoder-gpu-session" + ("-dry" if self.dry else "")))
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.summary = {"budget_s": args.budget, "dry_run": self.dry, "stages": [],
                        "triton_autotune": bool(args.autotune),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for d in (self.out, self.work):
            os.makedirs(d, exist_ok=True)
        for sub in ("logs", "results"):   # site/ (the wheels) stays for a second call
            shutil.rmtree(os.path.join(self.work, sub), ignore_errors=True)
            os.makedirs(os.path.join(self.work, sub))
        os.makedirs(os.path.join(self.work, "site"), exist_ok=True)
        self.logdir = os.path.join(self.work, "logs")
        self.triton_cache_dir = os.path.join(self.work, "triton-cache")
        self.inductor_cache_dir = os.path.join(self.work, "inductor-cache")
        # the Triton entries not to bring back: those there at the start (a warm machine's
        # earlier call returned them) and, after setup, every carried one (device/ included)
        self.carried = set(triton_cache_entries(self.triton_cache_dir))
        self.inductor_carried = self._inductor_files()
        self._packed = None
        self.session_log = open(os.path.join(self.out, "session.log"), "w")
        self.env = self._env()
        import importlib.util
        self.ctx = {"dry": self.dry, "work": self.work, "logdir": self.logdir,
                    "site": os.path.join(self.work, "site"), "workers": args.workers,
                    "xdist": importlib.util.find_spec("xdist") is not None,
                    "triton_cache": os.path.abspath(args.triton_cache)}

    def _env(self):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYENCODER_RESULTS_DIR"] = os.path.join(self.work, "results")
        # kept between calls on a warm machine: a second call reuses the first one's compiles
        env["TRITON_CACHE_DIR"] = self.triton_cache_dir
        # Inductor's FX graph and AOTAutograd caches (its Triton kernels go to TRITON_CACHE_DIR)
        env["TORCHINDUCTOR_CACHE_DIR"] = self.inductor_cache_dir
        site = os.path.join(self.work, "site")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, ROOT, env.get("PYTHONPATH")) if p)
        if not self.args.autotune:
            env["PYENCODER_TRITON_AUTOTUNE"] = "0"
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def say(self, msg):
        line = f"[{time.monotonic() - self.t0:6.1f} s] {msg}"
        print(line, flush=True)
        self.session_log.write(line + "\n")
        self.session_log.flush()

    def left(self):
        return self.deadline - time.monotonic()

    def run_stage(self, name, timeout, plan):
        rec = {"name": name, "status": "skipped", "seconds": 0.0, "commands": []}
        self.summary["stages"].append(rec)
        if name == "setup" and not self.dry:
            # the 150 s cap leaves room to build _C there when the prebuilt does not fit or load
            rec["prebuilt_fits"] = not self._needs_build()
        avail = min(timeout * self.args.timeout_scale, self.left())
        if avail < MIN_STAGE_S:
            rec["reason"] = f"budget: {self.left():.0f} s left"
            self.say(f"stage {name}: skipped ({rec['reason']})")
            return rec
        self.say(f"stage {name}: start (up to {avail:.0f} s)")
        stage_end = time.monotonic() + avail
        logpath = os.path.join(self.logdir, f"{name}.log")
        t0 = time.monotonic()
        status = "ok"
        before = set(triton_cache_entries(self.triton_cache_dir))
        with open(logpath, "a") as log:
            for label, argv, extra in plan(self.ctx):
                remaining = stage_end - time.monotonic()
                if remaining < 1:
                    rec["commands"].append({"label": label, "rc": None, "skipped": "stage time"})
                    status = "timeout"
                    continue
                log.write(f"\n== {name}/{label}\n")
                rc, dt = run_group(argv, {**self.env, **extra}, log, remaining)
                rec["commands"].append({"label": label, "rc": rc, "seconds": round(dt, 1)})
                self.say(f"  {name}/{label}: {'timeout' if rc is None else f'exit {rc}'} "
                         f"in {dt:.1f} s")
                if rc == 1 and "pytest" in argv and not self.dry:
                    self._rerun_fast_launch_off(rec["commands"][-1], argv, extra, log,
                                                stage_end)
                if rc is None:
                    status = "timeout"
                elif rc != 0 and status == "ok":
                    status = "failed"
        rec["status"] = status
        rec["seconds"] = round(time.monotonic() - t0, 1)
        self._append_log(name, logpath)
        if name == "setup":
            self._load_setup_facts()
            tc = self.summary["setup"].get("triton_cache")
            if isinstance(tc, dict):
                self.say(f"  triton cache: {tc.get('verdict')} ({tc.get('installed', 0)} entries)")
                dev = tc.get("device_cache") or {}
                if dev.get("carried"):
                    self.say(f"  device compiles of earlier calls: {dev.get('verdict')} "
                             f"({dev.get('installed', 0)} Triton entries, "
                             f"{dev.get('inductor_files', 0)} Inductor files)")
            before = set(triton_cache_entries(self.triton_cache_dir))   # the carried ones
            self.carried |= before
            self.inductor_carried.update(self._inductor_files())
        self._count_compiles(rec, before)
        self.say(f"stage {name}: {status} in {rec['seconds']} s")
        return rec

    def _rerun_fast_launch_off(self, cmd, argv, extra, log, stage_end):
        """RERUN_MAX comment above: the failed tests again with PYENCODER_FAST_LAUNCH=0."""
        junit = next((a.split("=", 1)[1] for a in argv if a.startswith("--junitxml=")), None)
        ids = failed_tests(junit) if junit else []
        remaining = stage_end - time.monotonic()
        if not ids or remaining < 5:
            return
        out = junit[:-4] + "_fast_launch_off.xml"
        log.write(f"\n== rerun of {len(ids[:RERUN_MAX])} failed tests with "
                  f"PYENCODER_FAST_LAUNCH=0\n")
        rc, dt = run_group(rerun_command(argv, ids[:RERUN_MAX], out),
                           {**self.env, **extra, "PYENCODER_FAST_LAUNCH": "0"}, log, remaining)
        passed = {n for n, st in junit_cases(out) if st == "passed"}
        cmd["fast_launch_rerun"] = {
            "rc": rc, "seconds": round(dt, 1), "failed_with_fast_launch": ids[:RERUN_MAX],
            "pass_without": [t for t in ids[:RERUN_MAX] if t in passed]}
        self.say(f"  rerun without the fast launch path: {len(passed)} of "
                 f"{len(ids[:RERUN_MAX])} failed tests pass"
                 + (" (the fast launch path is suspect: GPU_SESSION.md)" if passed else ""))

    def _count_compiles(self, rec, before):
        """Entries added to TRITON_CACHE_DIR during the stage: one per Triton compile, i.e. per miss
        of the carried cache (Inductor's kernels, e.g. Flex's, land there too: by name)."""
        now = triton_cache_entries(self.triton_cache_dir)
        new = [now[k] for k in now if k not in before]
        rec["triton_cache_new"] = len(new)
        rec["triton_cache_new_by_kernel"] = dict(sorted(collections.Counter(new).items()))
        rec["triton_cache_entries"] = len(now)
        if new:
            self.say(f"  {rec['name']}: {len(new)} Triton compiles (new cache entries): "
                     + ", ".join(f"{k} {v}" for k, v in rec["triton_cache_new_by_kernel"].items()))

    def _needs_build(self):
        try:
            import torch
            info = json.load(open(os.path.join(ROOT, ".prebuilt", "build_info.json")))
        except Exception:
            return True
        why = prebuilt_mismatch(info, torch.__version__, torch.version.cuda, csrc_hash())
        return why is not None

    def _append_log(self, name, path):
        size = os.path.getsize(path)
        self.session_log.flush()
        # 2 MiB a stage, and session.log under SESSION_LOG_CAP in all (9 stages of 2 MiB passed
        # the 16 MiB a file may have to come back)
        cap = max(min(STAGE_LOG_CAP, SESSION_LOG_CAP - os.path.getsize(self.session_log.name)),
                  64 * 2**10)
        self.session_log.write(f"\n======== {name} log ({size} bytes) ========\n")
        with open(path, "rb") as f:
            if size <= cap:
                text = f.read()
            else:
                text = f.read(cap // 4) + (f"\n[... {size - cap} bytes cut: full log in "
                                           "logs.tgz ...]\n").encode()
                f.seek(size - 3 * cap // 4)
                text += f.read()
            self.session_log.write(text.decode(errors="replace"))
        self.session_log.write("\n")
        self.session_log.flush()

    def _load_setup_facts(self):
        for fn in ("facts.json", "extension.json", "triton_cache.json"):
            try:
                got = json.load(open(os.path.join(self.work, fn)))
            except Exception as e:
                self.summary.setdefault("setup", {})[fn] = f"not written ({type(e).__name__})"
                continue
            if fn == "triton_cache.json":
                got = {"triton_cache": got}
            self.summary.setdefault("setup", {}).update(got)

    def flush_out(self):
        """Rewrite the $OUT files (each via a temporary name, so a cut write leaves the old one)."""
        self.pack_device_cache()
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _atomic_json(os.path.join(self.out, "summary.json"), self.summary)
        _atomic_tar(os.path.join(self.out, "logs.tgz"), self.logdir, "logs")
        res = os.path.join(self.work, "results")
        for slug in sorted(os.listdir(res)):
            if NAME_OK.match(slug) and os.path.isdir(os.path.join(res, slug)):
                _atomic_tar(os.path.join(self.out, f"results-{slug}.tgz"),
                            os.path.join(res, slug), slug)
        self.session_log.flush()

    def pack_device_cache(self):
        """$OUT/device-cache.tgz: the Triton entries compiled here (not carried) and Inductor's
        FX graph / AOTAutograd cache files, for the next call to carry (python -m
        benchmarks.triton_cache merge). Packed only when either changed since the last pack."""
        from benchmarks import triton_cache as tc
        try:
            new = frozenset(k for k in triton_cache_entries(self.triton_cache_dir)
                            if k not in self.carried)
            ind = {k: v for k, v in self._inductor_files().items()
                   if self.inductor_carried.get(k) != v}
            sig = (new, tuple(sorted(ind.items())))
            if (not new and not ind) or sig == self._packed:
                return None
            info = self._device_cache_info()
            got = tc.pack_device_cache(self.triton_cache_dir, self.carried,
                                       self.inductor_cache_dir,
                                       os.path.join(self.out, tc.DEVICE_ARCHIVE), info,
                                       os.path.join(self.work, "device-cache-staging"),
                                       inductor_carried=self.inductor_carried)
        except Exception as e:  # never costs the session more than this message
            self.say(f"  device cache: not packed ({type(e).__name__}: {e})")
            self.summary["device_cache"] = {"error": f"{type(e).__name__}: {e}"}
            return None
        self._packed = sig
        self.summary["device_cache"] = {k: got.get(k) for k in (
            "entries", "inductor_files", "bytes", "pack_s", "dropped_entries",
            "dropped_kernels", "inductor_dropped")}
        dropped = (f"; over the cap: dropped the {got['dropped_entries']} largest entries "
                   f"({json.dumps(got['dropped_kernels'])})" if got["dropped_entries"] else "")
        if got.get("inductor_dropped"):
            dropped += f"; Inductor files dropped ({got['inductor_dropped']})"
        self.say(f"  device cache: {got['entries']} Triton entries compiled here, "
                 f"{got['inductor_files']} Inductor cache files -> {tc.DEVICE_ARCHIVE} "
                 f"({got['bytes'] / 2**20:.2f} MiB) in {got['pack_s']:.2f} s{dropped}")
        return got

    def _inductor_files(self):
        from benchmarks import triton_cache as tc
        return tc.inductor_files(self.inductor_cache_dir)

    def _device_cache_info(self):
        setup = self.summary.get("setup") or {}
        tcache = setup.get("triton_cache") if isinstance(setup.get("triton_cache"), dict) else {}
        facts = tcache.get("device")
        source = "setup (the device's target)"
        if not facts:
            try:
                from benchmarks import triton_cache as tc
                facts, source = tc.key_facts(), "the driver (target assumed: sm_90)"
            except Exception as e:
                facts, source = None, f"unknown ({type(e).__name__}: {e})"
        return {"key_facts": facts, "key_facts_from": source, "gpu": setup.get("gpu"),
                "torch": setup.get("torch"), "run_id": setup.get("run_id"),
                "commit": setup.get("commit"), "dry_run": self.dry,
                "packed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def run(self):
        selected = set(self.args.stages or [s[0] for s in STAGES])
        self.say(f"gpu session: budget {self.args.budget} s, out {self.out}, work {self.work}"
                 f"{', DRY RUN (CPU)' if self.dry else ''}, xdist={self.ctx['xdist']}")
        for name, t_gpu, t_dry, plan in STAGES:
            if name not in selected:
                continue
            try:
                self.run_stage(name, t_dry if self.dry else t_gpu, plan)
            except Exception as e:    # a driver bug costs this stage, never the later ones
                rec = self.summary["stages"][-1] if self.summary["stages"] and \
                    self.summary["stages"][-1]["name"] == name else None
                if rec is None:
                    rec = {"name": name, "seconds": 0.0, "commands": []}
                    self.summary["stages"].append(rec)
                rec["status"] = "failed"
                rec["driver_error"] = f"{type(e).__name__}: {e}"
                self.say(f"stage {name}: driver error {type(e).__name__}: {e}")
            self.flush_out()
        bad = [s["name"] for s in self.summary["stages"] if s["status"] in ("failed", "timeout")]
        self.summary["failed_stages"] = bad
        self.summary["triton_compiles"] = sum(s.get("triton_cache_new", 0)
                                              for s in self.summary["stages"])
        self.flush_out()
        table = " | ".join(f"{s['name']} {s['status']} {s['seconds']:.0f}s"
                           for s in self.summary["stages"])
        self.say(f"done in {time.monotonic() - self.t0:.0f} s: {table}")
        self.session_log.close()
        return 1 if bad else 0


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _atomic_tar(path, folder, arcname):
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as t:
        t.add(folder, arcname=arcname)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Helpers the setup stage runs as subprocesses (they import torch; the driver need not)
# ------------------------------------------------------------------------------------------------

def setup_extension(work, dry):
    """Install the carried prebuilt pyencoder._C when it fits, else build it (16 jobs, sm_90);
    record what happened in <work>/extension.json."""
    import torch
    rep = {"torch": torch.__version__, "cuda": torch.version.cuda}
    pre = os.path.join(ROOT, ".prebuilt")
    try:
        info = json.load(open(os.path.join(pre, "build_info.json")))
    except (OSError, ValueError):
        info = None
    why = prebuilt_mismatch(info, torch.__version__, torch.version.cuda,
                            csrc_hash(os.path.join(ROOT, "csrc")))
    rep["prebuilt"] = info
    rep["prebuilt_mismatch"] = why
    print(f"prebuilt extension: {'fits' if why is None else why}", flush=True)
    pkg = os.path.join(ROOT, "pyencoder")
    if why is None and not dry:
        try:
            so = os.path.join(pre, info["so"])
            keep = {k: info[k] for k in ("version", "cuda_built", "reason", "torch", "cuda")}
            if not os.path.isfile(so):
                raise FileNotFoundError(f"{so} is missing")
        except (KeyError, TypeError, FileNotFoundError) as e:
            rep["prebuilt_error"] = f"{type(e).__name__}: {e}"
            print(f"the prebuilt extension cannot be installed ({rep['prebuilt_error']}); "
                  f"building here", flush=True)
        else:
            for f in glob.glob(os.path.join(pkg, "_C*.so")):
                os.remove(f)
            shutil.copy(so, pkg)
            with open(os.path.join(pkg, "_build_info.py"), "w") as f:
                f.write("# Written by benchmarks/gpu_session.py from .prebuilt/build_info.json.\n")
                f.write(f"BUILD_INFO = {keep!r}\n")
            rep["action"] = "prebuilt"
            rc = _check_extension(rep)
            if rc == 0:
                _atomic_json(os.path.join(work, "extension.json"), rep)
                return 0
            print("the prebuilt extension does not load; building here", flush=True)
    if dry:
        rep["action"] = "none (dry run: no CUDA build here)"
        print("dry run: the device would " + ("load the prebuilt .so" if why is None else
              "build pyencoder._C (PYENCODER_BUILD_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0)"))
        _atomic_json(os.path.join(work, "extension.json"), rep)
        return 0
    env = dict(os.environ, PYENCODER_BUILD_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    t0 = time.monotonic()
    # build_ext --inplace: the .so lands in pyencoder/ and setup.py rewrites _build_info.py
    rc = subprocess.call([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                         env=env)
    rep["action"] = "built"
    rep["build_rc"] = rc
    rep["build_s"] = round(time.monotonic() - t0, 1)
    rc = _check_extension(rep) if rc == 0 else rc
    _atomic_json(os.path.join(work, "extension.json"), rep)
    return rc


def _check_extension(rep):
    p = subprocess.run([sys.executable, "-c", "import pyencoder._ext as e; m = e.load(); "
                        "print('loaded' if m is not None else e.reason())"],
                       cwd=ROOT, capture_output=True, text=True)
    rep["load"] = (p.stdout + p.stderr).strip()[-500:]
    print("extension:", rep["load"], flush=True)
    return 0 if p.returncode == 0 and rep["load"].endswith("loaded") else 1


def setup_triton_cache(work, carried):
    """Install the carried Triton cache into TRITON_CACHE_DIR and compare its key facts with this
    Triton's; <work>/triton_cache.json holds the report. Never fails the stage for a missing or
    mismatched cache (that only costs the compiles); exit 0 unless the report cannot be made."""
    from benchmarks import triton_cache
    cache_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(work, "triton-cache")
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(work,
                                                                               "inductor-cache")
    path = os.path.join(work, "triton_cache.json")
    try:
        triton_cache.setup(carried, cache_dir, path, inductor_dir)
    except Exception as e:  # no triton, a broken cache: report, compile as usual
        print(f"triton cache: not installed ({type(e).__name__}: {e}); compiling", flush=True)
        _atomic_json(path, {"verdict": f"not installed: {type(e).__name__}: {e}",
                            "cache_dir": cache_dir})
    return 0


def facts(work):
    import platform

    import torch
    from benchmarks._common import copy_bandwidth_gbs, env_info
    f = dict(env_info())
    f["platform"] = platform.platform()
    try:
        import triton
        f["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR",
                                               os.path.expanduser("~/.triton/cache"))
        f["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import transformers
        f["transformers"] = transformers.__version__
    except ImportError as e:
        f["transformers"] = f"missing ({e})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 gpu_mem_gib=round(p.total_memory / 2**30, 1))
    f["copy_bw_gbs"] = round(copy_bandwidth_gbs(), 1)
    for k, v in sorted(f.items()):
        print(f"{k:20s} {v}")
    _atomic_json(os.path.join(work, "facts.json"), f)
    return 0


def check_out(out):
    """Problems with $OUT against the device tool's limits (8 files, 16 MiB each, 64 MiB in all,
    at most two folders deep, names [A-Za-z0-9._-]); [] when it fits."""
    probs, files, total = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for n in dirnames + filenames:
            if not NAME_OK.match(n):
                probs.append(f"bad name {os.path.join(rel, n)!r}")
        for n in filenames:
            files += 1
            size = os.path.getsize(os.path.join(dirpath, n))
            total += size
            if size > OUT_FILE_LIMIT:
                probs.append(f"{os.path.join(rel, n)}: {size} bytes > 16 MiB")
            if depth > 2:
                probs.append(f"{os.path.join(rel, n)}: more than two folders deep")
    if files > 8:
        probs.append(f"{files} files > 8")
    if total > 64 * 2**20:
        probs.append(f"{total} bytes in all > 64 MiB")
    return probs


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--budget", type=float, default=480, help="total seconds (default 480)")
    p.add_argument("--dry-run", action="store_true", help="rehearse on CPU (TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None, help="result folder (default $OUT)")
    p.add_argument("--work", default=None,
                   help="scratch folder (default /tmp/pyencoder-gpu-session)")
    p.add_argument("--stages", nargs="*", default=None, choices=[s[0] for s in STAGES])
    p.add_argument("--workers", type=int, default=16, help="pytest-xdist workers (default 16)")
    p.add_argument("--autotune", action="store_true", help="let the Triton autotuner run")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every stage's timeout (slow or loaded machines; CI's dry run)")
    p.add_argument("--list", action="store_true", help="print the stages' commands and exit")
    p.add_argument("--_setup-extension", dest="setup_extension", action="store_true",
                   help=argparse.SUPPRESS)
    p.add_argument("--triton-cache", default=os.path.join(ROOT, ".triton-cache"),
                   help="the carried Triton cache (default .triton-cache, built by make gpu-prep)")
    p.add_argument("--_facts", dest="facts", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_triton-cache", dest="setup_triton_cache", action="store_true",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be positive seconds; got {args.budget}")
    if args.timeout_scale <= 0:
        p.error(f"--timeout-scale must be positive; got {args.timeout_scale}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1; got {args.workers}")
    if args.setup_extension:
        return setup_extension(args.out, args.dry_run)
    if args.facts:
        return facts(args.out)
    if args.setup_triton_cache:
        return setup_triton_cache(args.out, args.triton_cache)
    if args.list:
        ctx = {"dry": args.dry_run, "work": "<work>", "logdir": "<work>/logs",
               "site": "<work>/site", "workers": args.workers, "xdist": True,
               "triton_cache": args.triton_cache}
        for name, t_gpu, t_dry, plan in STAGES:
            print(f"{name} ({t_dry if args.dry_run else t_gpu} s):")
            for label, argv, extra in plan(ctx):
                print(f"  {label}: {' '.join(argv)}" + (f"  [{extra}]" if extra else ""))
        return 0
    return Session(args).run()


if __name__ == "__main__":
    sys.exit(main())
