"""benchmarks/gpu_session.py, the one prepared GPU call, rehearsed on CPU so that the first device
call cannot fail on a typo.

- the dry run end to end (every stage, the same $OUT layout; stage timeouts scaled up so that a
  loaded machine does not time a stage out): every stage ok, the $OUT files within the device
  tool's limits (8 files, 16 MiB each, two folders deep, names [A-Za-z0-9._-]), logs and results
  archives hold what each stage wrote;
- a stage command's whole process group is killed on timeout (a grandchild too);
- the $OUT checker flags every limit; the prebuilt-extension check names each mismatch;
- the device call in benchmarks/GPU_SESSION.md fits the tool (command <= 2000 characters, at
  most 8 carried paths, the git-ignored ones the call needs: .prebuilt, .whl, .triton-cache);
- the dry run installs a (tiny) carried Triton cache and compares its key, installs the device's
  compiles of an earlier call (.triton-cache/device/: one entry, one Inductor file) as carried
  (none compiled, none packed again) (tests/test_triton_cache.py and
  tests/test_triton_cache_device.py cover the cache itself).
"""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_session as gs  # noqa: E402
from conftest import has_triton  # noqa: E402

# the dry run and the compile counters run Triton's interpreter / compiler
needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


def _run_killing_group(argv, timeout, **kw):
    p = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, **kw)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"dry run did not finish in {timeout} s:\n{out[-4000:]}")
    return p.returncode, out


def _tiny_triton_cache(path):
    """A carried cache of one (fake) entry whose key facts are this Triton's."""
    from benchmarks import triton_cache as tc
    key = "TINYENTRY"
    (path / key).mkdir(parents=True)
    (path / key / "_k.json").write_text("{}")
    (path / key / "_k.cubin").write_bytes(b"\x7fELF")
    (path / key / "__grp___k.json").write_text(
        json.dumps({"child_paths": {"_k.json": "_k.json", "_k.cubin": "_k.cubin"}}))
    tc.pack(str(path))
    (path / tc.BUILD_INFO).write_text(json.dumps(dict(tc.key_facts(), entries=1)))
    # the device's compiles of an earlier call, merged in .triton-cache/device/
    live, ind = path.parent / "earlier-live", path.parent / "earlier-inductor"
    (live / "DEVENTRY").mkdir(parents=True)
    for f in ("_d.json", "_d.cubin", "_d.ptx"):
        (live / "DEVENTRY" / f).write_text(f)
    files = ("_d.json", "_d.cubin", "_d.ptx")
    (live / "DEVENTRY" / "__grp___d.json").write_text(json.dumps(
        {"child_paths": {f: str(live / "DEVENTRY" / f) for f in files}}))
    (ind / "fxgraph" / "ab" / "fcarried").mkdir(parents=True)
    (ind / "fxgraph" / "ab" / "fcarried" / "entry").write_text("graph")
    arc = path.parent / tc.DEVICE_ARCHIVE
    tc.pack_device_cache(str(live), set(), str(ind), str(arc),
                         {"key_facts": tc.key_facts(), "gpu": "NVIDIA H100 80GB HBM3",
                          "run_id": "earlier"}, str(path.parent / "scratch"))
    tc.merge(str(arc), str(path))
    return key


@needs_triton
def test_dry_run_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    key = _tiny_triton_cache(tmp_path / "carried")
    env = dict(os.environ, TRITON_INTERPRET="1")
    rc, log = _run_killing_group(
        [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--out", str(out),
         "--work", str(work), "--budget", "100000", "--timeout-scale", "30",
         "--triton-cache", str(tmp_path / "carried")], 3600, env=env)
    assert rc == 0, log[-6000:]
    assert gs.check_out(str(out)) == []
    names = sorted(os.listdir(out))
    assert {"session.log", "summary.json", "logs.tgz"} <= set(names), names
    assert len(names) <= 5, names
    summary = json.load(open(out / "summary.json"))
    assert [s["name"] for s in summary["stages"]] == [s[0] for s in gs.STAGES]
    bad = [(s["name"], s["status"], s["commands"]) for s in summary["stages"]
           if s["status"] != "ok"]
    assert not bad, bad
    assert summary["dry_run"] and summary["failed_stages"] == []
    assert summary["setup"]["copy_bw_gbs"] > 0 and summary["setup"]["torch"]
    # the carried Triton cache: key facts compared, installed into the stages' TRITON_CACHE_DIR,
    # the group file pointing there; every stage counts its compiles (none in the interpreter)
    tcache = summary["setup"]["triton_cache"]
    assert tcache["verdict"] == "cache key matches" and tcache["installed"] == 1, tcache
    assert tcache["cache_dir"] == str(work / "triton-cache")
    grp = json.load(open(work / "triton-cache" / key / "__grp___k.json"))["child_paths"]
    assert grp["_k.cubin"] == str(work / "triton-cache" / key / "_k.cubin")
    # the device's compiles of an earlier call: installed, counted as carried, never packed again
    dev = tcache["device_cache"]
    assert dev["installed"] == 1 and dev["inductor_files"] == 1, dev
    assert dev["verdict"].startswith("key matches"), dev
    grp = json.load(open(work / "triton-cache" / "DEVENTRY" / "__grp___d.json"))["child_paths"]
    assert grp == {f: str(work / "triton-cache" / "DEVENTRY" / f) for f in ("_d.json", "_d.cubin")}
    assert (work / "inductor-cache" / "fxgraph" / "ab" / "fcarried" / "entry").exists()
    if "device-cache.tgz" in names:       # only what the dry run itself compiled (Inductor on CPU)
        with tarfile.open(out / "device-cache.tgz") as t:
            info = json.load(t.extractfile("device_cache_info.json"))
            assert "entries.tgz" not in t.getnames() and info["entries"] == 0, info
            if "inductor.tgz" in t.getnames():
                with tarfile.open(fileobj=t.extractfile("inductor.tgz")) as i:
                    assert "fxgraph/ab/fcarried/entry" not in i.getnames()
        assert summary["device_cache"]["entries"] == 0
    assert all(s["triton_cache_new"] == 0 for s in summary["stages"]), summary["stages"]
    assert summary["triton_compiles"] == 0
    with tarfile.open(out / "logs.tgz") as t:
        logs = set(t.getnames())
    for name, *_ in gs.STAGES:
        assert f"logs/{name}.log" in logs, logs
    res = [n for n in names if n.startswith("results-")]
    assert len(res) == 1, names
    with tarfile.open(out / res[0]) as t:
        got = {os.path.basename(n) for n in t.getnames()}
    for f in ("attention.jsonl", "conv.jsonl", "convnext.jsonl", "hf.jsonl", "attention_ext.jsonl"):
        assert f in got, got
    text = open(out / "session.log").read()
    for name, *_ in gs.STAGES:
        assert f"======== {name} log" in text
    assert "triton cache: cache key matches (1 entries)" in text


def test_timeout_kills_the_whole_process_group(tmp_path):
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
             "print('grandchild', p.pid, flush=True); time.sleep(600)")
    logpath = tmp_path / "log"
    with open(logpath, "w") as log:
        rc, _ = gs.run_group([sys.executable, "-c", child], dict(os.environ), log, 3)
    assert rc is None
    text = open(logpath).read()
    assert "[timeout after" in text
    m = re.search(r"grandchild (\d+)", text)
    assert m, text
    pid = int(m.group(1))
    for _ in range(100):  # the orphaned grandchild is reaped by init eventually
        try:
            state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.1)
    pytest.fail(f"grandchild {pid} still running (state {state})")


def test_run_group_returns_exit_code(tmp_path):
    with open(tmp_path / "log", "w") as log:
        rc, _ = gs.run_group([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"],
                             dict(os.environ), log, 600)
    assert rc == 3
    assert "hi" in open(tmp_path / "log").read()


def test_check_out_flags_every_limit(tmp_path):
    ok = tmp_path / "ok"
    (ok / "a" / "b").mkdir(parents=True)
    (ok / "summary.json").write_text("{}")
    (ok / "a" / "b" / "x.log").write_text("x")
    assert gs.check_out(str(ok)) == []
    bad = tmp_path / "bad"
    (bad / "a" / "b" / "c").mkdir(parents=True)
    (bad / "a" / "b" / "c" / "deep.txt").write_text("x")
    (bad / "bad name.txt").write_text("x")
    with open(bad / "big.bin", "wb") as f:
        f.truncate(17 * 2**20)
    for i in range(7):
        (bad / f"f{i}").write_text("x")
    probs = " | ".join(gs.check_out(str(bad)))
    for what in ("two folders deep", "bad name", "> 16 MiB", "files > 8"):
        assert what in probs, probs


def test_prebuilt_mismatch_names_the_difference():
    info = {"cuda_built": True, "torch": "2.11.0+cu130", "cuda": "13.0", "csrc_sha256": "abc"}
    assert gs.prebuilt_mismatch(info, "2.11.0+cu130", "13.0", "abc") is None
    assert "torch 2.11.0+cu130" in gs.prebuilt_mismatch(info, "2.11.0+cu128", "12.8", "abc")
    assert "CUDA 13.0" in gs.prebuilt_mismatch(info, "2.11.0+cu130", "12.8", "abc")
    assert "csrc/ changed" in gs.prebuilt_mismatch(info, "2.11.0+cu130", "13.0", "abd")
    assert "no prebuilt" in gs.prebuilt_mismatch(None, "2.11.0+cu130", "13.0", "abc")
    assert "no prebuilt" in gs.prebuilt_mismatch({"cuda_built": False}, "x", "y", "abc")


def test_csrc_hash_sees_content_and_names(tmp_path):
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "k.cu").write_text("a")
    h1 = gs.csrc_hash(str(tmp_path))
    (tmp_path / "op" / "k.cu").write_text("b")
    h2 = gs.csrc_hash(str(tmp_path))
    os.rename(tmp_path / "op" / "k.cu", tmp_path / "op" / "j.cu")
    assert len({h1, h2, gs.csrc_hash(str(tmp_path))}) == 3


def test_bad_arguments_are_refused():
    for argv in (["--budget", "0"], ["--timeout-scale", "-1"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as e:
            gs.main(argv)
        assert e.value.code == 2


def test_documented_device_call_fits_the_tool():
    doc = open(os.path.join(ROOT, "benchmarks", "GPU_SESSION.md")).read()
    m = re.search(r"<!-- device-call -->\s*```json\n(.*?)```", doc, re.S)
    assert m, "GPU_SESSION.md: no ```json block after <!-- device-call -->"
    call = json.loads(m.group(1))
    assert len(call["command"]) <= 2000
    assert "benchmarks.gpu_session" in call["command"]
    assert len(call["carry"]) <= 8 and {".prebuilt", ".whl", ".triton-cache"} <= set(call["carry"])
    assert call["timeout_s"] <= 600
    budget = int(re.search(r"--budget (\d+)", call["command"]).group(1))
    assert budget + 30 <= call["timeout_s"]
    in_git = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT,
                            capture_output=True).returncode == 0
    for path in call["carry"] if in_git else ():  # carried paths are git-ignored build outputs
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_stage_timeouts_fit_the_budget():
    """Issue 12's arithmetic: a typical setup plus every capped stage's GPU timeout (all but rest,
    which takes what is left) fits the default budget and the documented call's budget, and the
    call leaves room in the 15 device minutes for a machine start and a short second call."""
    doc = open(os.path.join(ROOT, "benchmarks", "GPU_SESSION.md")).read()
    call = json.loads(re.search(r"<!-- device-call -->\s*```json\n(.*?)```", doc, re.S).group(1))
    budget = int(re.search(r"--budget (\d+)", call["command"]).group(1))
    capped = sum(t for name, t, _, _ in gs.STAGES if name not in ("setup", "rest"))
    assert gs.SETUP_TYPICAL_S + capped <= min(budget, 480), (gs.SETUP_TYPICAL_S, capped, budget)
    assert gs.STAGES[-1][0] == "rest"
    names = [s[0] for s in gs.STAGES]
    # the benchmarks before the tests that passed on the first GPU call (GPU_SESSION.md)
    assert names[:3] == ["setup", "profile", "attention_table"]
    assert names.index("attention_ext") < names.index("attention") < names.index("rest")
    assert 120 + call["timeout_s"] + 120 <= 15 * 60    # start, the call, a short second call


@needs_triton
def test_compile_counter_records_launch_keys():
    """tests/_count_compiles.py on the decode kernel test (fp16 and bf16: two keys, each launch
    recorded once per key)."""
    argv = [sys.executable, os.path.join(ROOT, "tests", "_count_compiles.py"), "--tier", "gpu",
            "tests/test_streaming_decode_triton.py::test_decode_kernel_half_on_gpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rc, out = _run_killing_group(argv, 1800, env=env)
    assert rc == 0, out[-4000:]
    res = json.loads(out[out.index("{"):])
    assert res["per_kernel"] == {"_decode_attention_fwd_kernel": 2}, res
    assert res["tests_that_launch"] == 2 and res["compiles"] == 2


_SPECIALISATION = r"""
import json, sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
from _count_compiles import _Recorder
rec = _Recorder(); rec.install()

@triton.jit
def _k(X, n, m, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), n + m)

x = torch.empty(64)
for i, (n, m, block) in enumerate([(16, 5, 8), (32, 7, 8), (13, 5, 8), (1, 5, 8), (16, 5, 16)]):
    rec.test = i
    _k[(1,)](x, n, m, BLOCK=block)
rec.test = 5
_k[(1,)](x[1:], 16, 5, BLOCK=8)
rec.test = 6
_k[(1,)](x, 16, 5, BLOCK=8, num_warps=8)
print(json.dumps([sorted(u) for u in rec.keys.values()]))
"""


@needs_triton
def test_compile_counter_models_triton_specialisation(tmp_path):
    """Integers divisible by 16 share a key, other integers get another, 1 is a constant; a
    constexpr, a misaligned pointer or num_warps make new keys (Triton's cache key)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "spec.py"   # @triton.jit needs its source in a file
    script.write_text(_SPECIALISATION)
    p = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "tests")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.splitlines()[-1]) == [[0, 1], [2], [3], [4], [5], [6]]


@needs_triton
def test_gpu_quick_tier_covers_every_kernel_and_dtype():
    """The fast GPU tier (conftest's gpu_quick predicates) selects, per stage file, the tests the
    session relies on: every attention dtype, the CUDA conv widths 1..256 in every dtype, a
    Triton conv case per dtype, the decode kernel, CUDA graphs, the fused ConvNeXt, the models."""
    files = gs.ATTENTION_TESTS + ["tests/test_conv_gpu.py"] + gs.STREAMING_TESTS + \
        gs.CONVNEXT_TESTS
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--collect-only", "-m", "gpu_quick", *files], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ids = [line for line in p.stdout.splitlines() if "::" in line]
    for f in files:
        assert any(i.startswith(f) for i in ids), f
    grid = [i for i in ids if "test_gpu_grid" in i]
    for dt in ("float16", "bfloat16", "float32"):
        assert any(dt in i for i in grid), dt
    assert any("test_gpu_long_sequences" in i and "16384" in i for i in ids)
    for dt in ("float16", "bfloat16", "float32"):
        for k in (1, 4, 7, 31, 128, 256):
            assert f"tests/test_conv_gpu.py::test_depthwise_widths[torch.{dt}-{k}-cuda]" in ids
        assert any(f"{dt}" in i and i.endswith("-triton]") for i in ids
                   if "test_depthwise_widths" in i), dt
    assert "tests/test_conv_gpu.py::test_update_state_indices[triton]" in ids
    # the slow grid stays out of the tier
    assert len(grid) <= 6 and not any("test_gpu_grid" in i and "-128-" in i for i in ids)


def test_setup_installs_a_fitting_prebuilt_extension(tmp_path, monkeypatch):
    """The device path of the setup stage with a prebuilt that fits this torch: the .so lands in
    pyencoder/ and _build_info.py says what it was built against (loading is faked: no CUDA)."""
    import torch
    root = tmp_path / "repo"
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "k.cu").write_text("__global__ void k() {}")
    (root / "pyencoder").mkdir()
    (root / "pyencoder" / "_C.old.so").write_text("stale")
    (root / ".prebuilt").mkdir()
    so = "_C.cpython-312-x86_64-linux-gnu.so"
    (root / ".prebuilt" / so).write_bytes(b"\x7fELF-prebuilt")
    info = {"version": "0.1.0", "cuda_built": True, "reason": "", "torch": torch.__version__,
            "cuda": torch.version.cuda, "csrc_sha256": gs.csrc_hash(str(root / "csrc")), "so": so}
    (root / ".prebuilt" / "build_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(gs, "ROOT", str(root))
    monkeypatch.setattr(gs, "_check_extension", lambda rep: rep.update(load="loaded") or 0)
    assert gs.setup_extension(str(tmp_path), dry=False) == 0
    assert (root / "pyencoder" / so).read_bytes() == b"\x7fELF-prebuilt"
    assert not (root / "pyencoder" / "_C.old.so").exists()
    ns = {}
    exec((root / "pyencoder" / "_build_info.py").read_text(), ns)
    assert ns["BUILD_INFO"]["torch"] == torch.__version__ and ns["BUILD_INFO"]["cuda_built"]
    rep = json.load(open(tmp_path / "extension.json"))
    assert rep["action"] == "prebuilt" and rep["prebuilt_mismatch"] is None


def test_conv_stage_caps_the_benchmark_and_runs_the_cudnn_kind_tests():
    """The conv stage's bench_conv stops starting cases after CONV_BENCH_MAX_S so its tests keep
    most of the stage (the second GPU call cut them off after a 23.4 s bench), and its pytest
    runs the cuda backend's cudnn-kind GPU tests first."""
    ctx = dict(dry=False, xdist=False, workers=1, logdir="/tmp")
    (_, bench, _), (_, tests, _), (label, ab, _) = gs.plan_conv(ctx)
    i = bench.index("--max-seconds")
    budget = dict((name, t) for name, t, _, _ in gs.STAGES)["conv"]
    assert 0 < float(bench[i + 1]) <= budget / 2 and "--quick" in bench
    assert tests[-2:] == gs.CONV_TESTS and gs.CONV_TESTS[0] == "tests/test_conv_cudnn_path.py"
    # last, with what the stage has left: the grouped conv's tile / layout A/B, which parses
    from benchmarks import bench_conv
    assert label == "bench-conv-grouped-ab" and ab[-len(gs.CONV_GRP_AB_ARGS):] == \
        gs.CONV_GRP_AB_ARGS
    args = bench_conv.parser().parse_args(gs.CONV_GRP_AB_ARGS)
    assert args.suites == ["grouped"] and args.grp_tiles and "cl" in args.layouts


def test_rest_stage_runs_the_demo_first_on_a_gpu():
    """The last stage starts with the README's main job (python -m pyencoder demo --quick, its
    arguments accepted by the command line) on a GPU, not in the dry run, then the rest of the
    GPU tests."""
    from pyencoder.__main__ import build_parser
    gpu = gs.plan_rest(dict(dry=False, xdist=False, workers=1, logdir="/tmp"))
    assert [label for label, _, _ in gpu] == ["demo", "pytest"]
    argv = gpu[0][1]
    assert argv[1:4] == ["-m", "pyencoder", "demo"]
    p, _ = build_parser()
    assert p.parse_args(argv[3:]).quick is True
    dry = gs.plan_rest(dict(dry=True, xdist=False, workers=1, logdir="/tmp"))
    assert [label for label, _, _ in dry] == ["pytest"]


def test_failed_tests_rerun_without_the_fast_launch_path(tmp_path):
    """A failing pytest command's failed tests are named from its junit XML (module path and test
    classes kept) and rerun alone, narrowed from the stage's command, with the new junit file."""
    from benchmarks import gpu_session as gs
    junit = tmp_path / "x.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite>'
        '<testcase classname="tests.test_conv_gpu" name="test_a[cuda-4]"/>'
        '<testcase classname="tests.test_conv_gpu" name="test_b[cuda-4]"><failure message="x"/>'
        '</testcase>'
        '<testcase classname="tests.test_models.TestStream" name="test_c"><error message="y"/>'
        '</testcase>'
        '<testcase classname="tests.test_models" name="test_d"><skipped/></testcase>'
        '<testcase classname="tests.test_conv_gpu" name="test_b[cuda-4]"><error message="z"/>'
        '</testcase>'
        '</testsuite></testsuites>')
    assert gs.failed_tests(str(junit)) == ["tests/test_conv_gpu.py::test_b[cuda-4]",
                                           "tests/test_models.py::TestStream::test_c"]
    statuses = dict(gs.junit_cases(str(junit)))
    assert statuses["tests/test_conv_gpu.py::test_a[cuda-4]"] == "passed"
    assert statuses["tests/test_models.py::test_d"] == "skipped"
    assert gs.failed_tests(str(tmp_path / "missing.xml")) == []
    ctx = {"logdir": str(tmp_path), "xdist": True, "dry": False, "workers": 8}
    argv = gs._pytest("gpu_quick", ["tests/test_conv_gpu.py", "tests/test_models.py"], ctx,
                      "x.xml", ("-k", "bf16"))
    rerun = gs.rerun_command(argv, ["tests/test_conv_gpu.py::test_b[cuda-4]"],
                             str(tmp_path / "y.xml"))
    assert rerun[:rerun.index("pytest") + 1] == argv[:argv.index("pytest") + 1]
    tail = rerun[rerun.index("pytest") + 1:]
    assert tail[-1] == "tests/test_conv_gpu.py::test_b[cuda-4]"
    assert f"--junitxml={tmp_path / 'y.xml'}" in tail
    for gone in ("-m", "-k", "-n", "gpu_quick", "bf16", "8", "tests/test_models.py",
                 f"--junitxml={tmp_path / 'x.xml'}"):
        assert gone not in tail
    assert "-v" in tail and "-p" in tail and "no:cacheprovider" in tail


def test_a_failing_test_command_reruns_its_failures_without_fast_launch(tmp_path, monkeypatch):
    """Session._rerun_fast_launch_off runs the failed tests alone with PYENCODER_FAST_LAUNCH=0 and
    records which of them pass without the fast launch path."""
    import io
    import time

    from benchmarks import gpu_session as gs
    junit = tmp_path / "conv.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_conv_gpu" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_conv_gpu" name="test_b"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    calls = []

    def run_group(argv, env, log, timeout):
        calls.append((argv, env))
        out = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
        with open(out, "w") as f:      # test_a passes without the fast path, test_b still fails
            f.write('<testsuites><testsuite>'
                    '<testcase classname="tests.test_conv_gpu" name="test_a"/>'
                    '<testcase classname="tests.test_conv_gpu" name="test_b">'
                    '<failure message="x"/></testcase></testsuite></testsuites>')
        return 1, 0.5
    monkeypatch.setattr(gs, "run_group", run_group)
    session = gs.Session.__new__(gs.Session)
    session.env = {"A": "1"}
    said = []
    session.say = said.append
    argv = gs._pytest("gpu_quick", ["tests/test_conv_gpu.py"],
                      {"logdir": str(tmp_path), "xdist": False, "dry": False}, "conv.xml")
    cmd = {"label": "pytest", "rc": 1}
    session._rerun_fast_launch_off(cmd, argv, {"B": "2"}, io.StringIO(), time.monotonic() + 60)
    (rerun, env), = calls
    assert env["PYENCODER_FAST_LAUNCH"] == "0" and env["A"] == "1" and env["B"] == "2"
    assert rerun[-2:] == ["tests/test_conv_gpu.py::test_a", "tests/test_conv_gpu.py::test_b"]
    r = cmd["fast_launch_rerun"]
    assert r["pass_without"] == ["tests/test_conv_gpu.py::test_a"] and r["rc"] == 1
    assert r["failed_with_fast_launch"] == ["tests/test_conv_gpu.py::test_a",
                                            "tests/test_conv_gpu.py::test_b"]
    assert any("fast launch path is suspect" in m for m in said)
    calls.clear()      # no time left in the stage: no rerun
    session._rerun_fast_launch_off({}, argv, {}, io.StringIO(), time.monotonic() + 1)
    assert not calls


def test_setup_builds_when_the_prebuilt_so_is_missing(tmp_path, monkeypatch):
    """A fitting build_info.json whose .so was not carried: the setup stage builds the extension
    there (it deleted pyencoder/_C*.so, then failed in shutil.copy with no extension.json)."""
    import torch
    root = tmp_path / "repo"
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "k.cu").write_text("__global__ void k() {}")
    (root / "pyencoder").mkdir()
    (root / ".prebuilt").mkdir()
    info = {"version": "0.1.0", "cuda_built": True, "reason": "", "torch": torch.__version__,
            "cuda": torch.version.cuda, "csrc_sha256": gs.csrc_hash(str(root / "csrc")),
            "so": "_C.cpython-312-x86_64-linux-gnu.so"}
    (root / ".prebuilt" / "build_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(gs, "ROOT", str(root))
    monkeypatch.setattr(gs, "_check_extension", lambda rep: rep.update(load="loaded") or 0)
    built = []
    monkeypatch.setattr(gs.subprocess, "call", lambda argv, **kw: built.append(argv) or 0)
    assert gs.setup_extension(str(tmp_path), dry=False) == 0
    assert built and "build_ext" in built[0]
    rep = json.load(open(tmp_path / "extension.json"))
    assert rep["action"] == "built" and "is missing" in rep["prebuilt_error"]
    del info["so"]                               # a build_info without its .so's name
    (root / ".prebuilt" / "build_info.json").write_text(json.dumps(info))
    assert gs.setup_extension(str(tmp_path), dry=False) == 0
    assert json.load(open(tmp_path / "extension.json"))["prebuilt_error"].startswith("KeyError")
    assert gs.prebuilt_mismatch([1, 2], "2.11", "13.0", "x").startswith("no prebuilt")


def test_session_log_stays_under_the_out_file_limit(tmp_path):
    """Nine stages with logs over the 2 MiB per-stage cap made session.log ~18 MiB, over the
    16 MiB a file may have to come back at all."""
    session = gs.Session.__new__(gs.Session)
    session.session_log = open(tmp_path / "session.log", "w")
    big = tmp_path / "stage.log"
    big.write_bytes(b"x" * (3 * 2**20))
    for i in range(len(gs.STAGES) + 3):
        session._append_log(f"stage{i}", str(big))
    session.session_log.close()
    size = os.path.getsize(tmp_path / "session.log")
    assert size < gs.OUT_FILE_LIMIT and size <= gs.SESSION_LOG_CAP + 2**20
    text = (tmp_path / "session.log").read_text()
    last = text[text.rindex("======== stage"):]      # past the cap: still its head and tail
    assert 60 * 2**10 <= len(last) <= 70 * 2**10 and "bytes cut" in last


def test_a_driver_error_in_one_stage_leaves_the_others(tmp_path, monkeypatch):
    """An exception in the driver (not in a stage's command) failed that stage only: the later
    stages ran and summary.json was written."""
    import argparse
    session = gs.Session.__new__(gs.Session)
    session.args = argparse.Namespace(stages=None, budget=480)
    session.dry, session.out, session.work = True, str(tmp_path), str(tmp_path)
    session.ctx = {"xdist": False}
    session.summary = {"stages": []}
    session.t0 = time.monotonic()
    session.session_log = open(tmp_path / "session.log", "w")
    session.say = lambda msg: None
    flushed = []
    session.flush_out = lambda: flushed.append(len(session.summary["stages"]))
    names = [s[0] for s in gs.STAGES]

    def run_stage(name, timeout, plan):
        session.summary["stages"].append({"name": name, "status": "ok", "seconds": 1.0,
                                          "commands": []})
        if name == names[1]:
            raise KeyError("boom")
    session.run_stage = run_stage
    assert session.run() == 1
    st = session.summary["stages"]
    assert [s["name"] for s in st] == names
    assert st[1]["status"] == "failed" and "KeyError" in st[1]["driver_error"]
    assert session.summary["failed_stages"] == [names[1]] and len(flushed) == len(names) + 1


def test_results_keep_the_newest_run_of_each_case():
    """summarize._latest_run: two runs at one commit (a second call, a re-run stage) kept run 1's
    rows beside run 2's (the streaming variants shared a case key); a channel-last grouped conv
    row replaced the channel-first one (no layout in the key) and the README could not tell
    them apart."""
    from benchmarks import readme
    from benchmarks.summarize import _latest_run
    base = dict(bench="streaming", mode="step_latency", batch=1, chunk_ms=80, mask="chunked",
                dtype="bfloat16", commit="abc")
    rows = [dict(base, run_id=run, variant=v, p50_ms=p)
            for run, p in (("R1", 1.0), ("R2", 2.0))
            for v in (None, "conv-triton", "decoder", "encoder")]
    kept = _latest_run(rows)
    assert [(r["run_id"], r["variant"]) for r in kept] == [
        ("R2", None), ("R2", "conv-triton"), ("R2", "decoder"), ("R2", "encoder")]
    # a run's own repeated rows of one case are all kept; another commit's rows are not
    rows2 = [dict(base, commit="old", run_id="R0")] + rows[4:] + [dict(rows[4], p50_ms=3.0)]
    assert [r["p50_ms"] for r in _latest_run(rows2)] == [2.0, 2.0, 2.0, 2.0, 3.0]
    common = dict(bench="conv", suite="grouped", dtype="float16", B=8, C=768, L=2048, k=128,
                  groups=16, stride=1, mode="fwd", commit="abc")
    conv = [dict(common, run_id="R1", provider=p, layout="cf", median_ms=1.0)
            for p in ("pyencoder-triton", "cudnn")] + \
           [dict(common, run_id="R2", provider=p, layout="cl", median_ms=5.0)
            for p in ("pyencoder-triton", "cudnn")]
    kept = _latest_run(conv)
    assert [r["layout"] for r in kept] == ["cf", "cf", "cl", "cl"]
    att = dict(bench="attention", provider="pyencoder-triton", N=1500, mask="band(250,3)",
               commit="abc")
    modes = [dict(att, run_id="R1", rope_mode="fused"), dict(att, run_id="R2", rope_mode="pre")]
    assert _latest_run(modes) == modes          # A/B rows of one case: both kept
    lines = readme.conv(kept).splitlines()
    assert sum("channels-last" in line for line in lines) == 2
