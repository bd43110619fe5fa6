"""benchmarks/triton_cache.py: a Triton cache built on a machine without a GPU is hit on the device.

- one tiny kernel, with this Python's Triton, through the build's own code path (the launch goes
  through JITFunction.run on a fake sm_90 driver and is captured at _do_compile; the pool compiles
  it through JITFunction.preload; prune; pack; install into another folder): a second process that
  launches the same specialisation (warmup: the JIT's path up to the launch) finds it without
  running the backend compiler (CUDABackend.add_stages counted), under the captured hash; an
  integer of the same specialisation class hits too; a changed specialisation compiles, and so
  does the pruned cache used in place (its group files list bare names: install must rewrite them);
- setup() says "cache key matches", "mismatch: compiling" naming the field, or "no cache carried";
- every session stage records the cache entries (compiles) it added.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_session as gs  # noqa: E402
from benchmarks import triton_cache as tc  # noqa: E402

_KERNEL = """
import triton, triton.language as tl

@triton.jit
def _tiny_cache_kernel(X, n, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), n + tl.arange(0, BLOCK))
"""

_DRIVER = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.dirname(os.path.abspath(__file__))]


def main(mode, cache, arg):
    os.environ["TRITON_CACHE_DIR"] = cache
    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from benchmarks import triton_cache as tc
    from tinykern import _tiny_cache_kernel
    tc.use_target()
    calls = []
    add_stages = CUDABackend.add_stages

    def counting(self, *a, **k):       # runs once per compile, never on a cache hit
        calls.append(1)
        return add_stages(self, *a, **k)
    CUDABackend.add_stages = counting
    x = torch.randn(64)
    if mode == "capture":
        cap = tc.CompileCapture()
        cap.install()
        _tiny_cache_kernel[(1,)](x, int(arg), BLOCK=8)
        return {"requests": list(cap.requests.values()), "backend_compiles": len(calls)}
    if mode == "compile":
        return {"results": tc.compile_all(json.load(open(arg)), cache, 1)}
    k = _tiny_cache_kernel.warmup(x, int(arg), BLOCK=8, grid=(1,))
    return {"backend_compiles": len(calls), "hash": k.hash}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[2:5])))
"""


def _has_triton_cuda_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        return True
    except ImportError:
        return False


needs_triton = pytest.mark.skipif(not _has_triton_cuda_backend(),
                                  reason="triton with its CUDA backend is not installed")


@pytest.fixture
def drive(tmp_path):
    (tmp_path / "tinykern.py").write_text(_KERNEL)
    (tmp_path / "drive.py").write_text(_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(mode, cache, arg):
        p = subprocess.run([sys.executable, str(tmp_path / "drive.py"), ROOT, mode, str(cache),
                            str(arg)], env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-4000:]
        return json.loads(p.stdout.splitlines()[-1])
    return run


@needs_triton
def test_built_cache_is_hit_after_install_and_a_new_specialisation_misses(tmp_path, drive):
    staging, device = tmp_path / "staging", tmp_path / "device-cache"
    cap = drive("capture", tmp_path / "unused", 16)
    assert cap["backend_compiles"] == 0 and len(cap["requests"]) == 1, cap
    req = cap["requests"][0]
    assert req["name"] == "_tiny_cache_kernel" and '"arch": "sm90"' in req["spec"]
    (tmp_path / "req.json").write_text(json.dumps(cap["requests"]))
    res = drive("compile", staging, tmp_path / "req.json")["results"]
    assert [(r["hash"], r["ok"]) for r in res] == [(req["hash"], True)], res
    size = tc.prune(str(staging))
    ents = tc.entries(str(staging))
    assert list(ents.values()) == ["_tiny_cache_kernel"]
    (key,) = ents
    files = sorted(os.listdir(staging / key))
    assert files == ["__grp___tiny_cache_kernel.json", "_tiny_cache_kernel.cubin",
                     "_tiny_cache_kernel.json"], files
    assert size == sum(os.path.getsize(staging / key / f) for f in files)
    shutil.copytree(staging, tmp_path / "in-place")
    assert 0 < tc.pack(str(staging)) < size
    assert sorted(os.listdir(staging)) == [tc.ARCHIVE]
    assert tc.install(str(staging), str(device)) == 1
    grp = json.load(open(device / key / files[0]))["child_paths"]
    assert grp == {f: str(device / key / f) for f in files[1:]}, grp
    # the same launch in a fresh process: loaded, not compiled, under the captured hash
    hit = drive("launch", device, 16)
    assert hit == {"backend_compiles": 0, "hash": req["hash"]}, hit
    assert drive("launch", device, 48)["backend_compiles"] == 0     # 48 % 16 == 0: same key
    assert len(tc.entries(str(device))) == 1
    miss = drive("launch", device, 13)                               # not divisible by 16
    assert miss["backend_compiles"] == 1 and miss["hash"] != req["hash"], miss
    assert len(tc.entries(str(device))) == 2
    # the pruned cache used in place lists bare names, which Triton drops: install is needed
    assert drive("launch", tmp_path / "in-place", 16)["backend_compiles"] == 1


def _fake_carried(path, built):
    key = "ABCDEFGHIJ"
    (path / key).mkdir(parents=True)
    (path / key / "_k.json").write_text("{}")
    (path / key / "_k.cubin").write_bytes(b"\x7fELF")
    (path / key / "__grp___k.json").write_text(
        json.dumps({"child_paths": {"_k.json": "_k.json", "_k.cubin": "_k.cubin"}}))
    if built is not None:
        (path / tc.BUILD_INFO).write_text(json.dumps(dict(built, entries=1)))
    return key


@needs_triton
def test_setup_compares_the_key_facts_and_installs(tmp_path, capsys):
    here = tc.key_facts()
    assert here["target"] == [*tc.TARGET] and "ptxas" in here["backend_hash"]
    assert len(here["triton_key_sha256"]) == 64
    key = _fake_carried(tmp_path / "ok", here)
    rep = tc.setup(str(tmp_path / "ok"), str(tmp_path / "cache1"), str(tmp_path / "rep.json"))
    assert rep["verdict"] == "cache key matches" and rep["installed"] == 1, rep
    assert json.load(open(tmp_path / "rep.json"))["verdict"] == "cache key matches"
    grp = json.load(open(tmp_path / "cache1" / key / "__grp___k.json"))["child_paths"]
    assert grp["_k.cubin"] == str(tmp_path / "cache1" / key / "_k.cubin")
    out = capsys.readouterr().out
    assert "cache key matches" in out and "triton_key_sha256" in out
    other = dict(here, triton_key_sha256="0" * 64, backend_hash="ptxas 12.0-90")
    _fake_carried(tmp_path / "bad", other)
    rep = tc.setup(str(tmp_path / "bad"), str(tmp_path / "cache2"))
    assert rep["verdict"] == "mismatch: compiling (differs: triton_key_sha256, backend_hash)"
    assert rep["installed"] == 1        # harmless: those entries are never looked up
    rep = tc.setup(str(tmp_path / "absent"), str(tmp_path / "cache3"))
    assert rep["verdict"] == "no cache carried: compiling" and rep["entries_after_install"] == 0
    assert tc.compare(here, dict(here, env_vars={"TRITON_DEFAULT_FP_FUSION": "false"})) == \
        ["env_vars"]


def test_session_stages_count_the_cache_entries_they_add(tmp_path, monkeypatch):
    """A stage whose command adds an entry to TRITON_CACHE_DIR records one compile, by name."""
    add = ("import os; d = os.path.join(os.environ['TRITON_CACHE_DIR'], 'NEWKEY'); "
           "os.makedirs(d); open(os.path.join(d, '__grp___fwd_kernel.json'), 'w').write('{}')")
    args = argparse.Namespace(dry_run=True, out=str(tmp_path / "out"), work=str(tmp_path / "w"),
                              budget=1000, autotune=False, workers=1, timeout_scale=1.0,
                              triton_cache=str(tmp_path / "none"))
    s = gs.Session(args)
    assert s.env["TRITON_CACHE_DIR"] == str(tmp_path / "w" / "triton-cache")
    os.makedirs(s.env["TRITON_CACHE_DIR"])
    _fake_carried(tmp_path / "w" / "triton-cache", None)     # an entry there before the stage
    rec = s.run_stage("demo", 60, lambda ctx: [("add", [sys.executable, "-c", add], {})])
    assert rec["status"] == "ok", rec
    assert rec["triton_cache_new"] == 1 and rec["triton_cache_entries"] == 2
    assert rec["triton_cache_new_by_kernel"] == {"_fwd_kernel": 1}
    rec = s.run_stage("again", 60, lambda ctx: [("nothing", [sys.executable, "-c", "0"], {})])
    assert rec["triton_cache_new"] == 0
    s.session_log.close()


def test_bad_jobs_is_refused_naming_the_knob(capsys):
    with pytest.raises(SystemExit) as e:
        tc.main(["build", "--jobs", "0"])
    assert e.value.code == 2
    assert "--jobs (GPU_PREP_JOBS) must be >= 1; got 0" in capsys.readouterr().err


_STAGE_DRIVER = r"""
import collections, json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
from benchmarks import triton_cache as tc
import _count_compiles as cc
from triton.runtime.jit import JITFunction
cc.prepare(False, "sm90")
real_run = JITFunction.run
cap = tc.CompileCapture()


class Recorder(cc._Recorder):
    def install(self):
        super().install()
        record = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            record(fn, *args, grid=grid, warmup=warmup, **kwargs)
            return real_run(fn, *args, grid=grid, warmup=True, **kwargs)
        JITFunction.run = run
        tc.use_target(tc.TARGET)
        cap.install()


rec = Recorder()
rec.install()
failed = []
with cc._cuda_to_cpu_mode():
    tc._bench_stage_launches(rec, failed)
names = collections.Counter(r["name"] for r in cap.requests.values())
print(json.dumps({"names": names, "failed": failed}))
"""


@needs_triton
def test_bench_stage_launches_are_captured(tmp_path):
    """The build captures the Triton launches of bench_conv / bench_convnext --quick and of
    bench_streaming's step_fixed at their GPU shapes: every kernel the c446fb01b9e0 call compiled
    in those stages (conv: 16 of ours, all bench_conv's; streaming: the decode kernel) plus the
    fused ring write and the fused ConvNeXt kernel, with no case failing; the stack's strided
    dense convs run cuDNN on the device (no Triton conv), except in bench_streaming's
    conv-triton variant, whose launches are captured too, as are the encoder variant's (its
    running GroupNorm kernel) and bench_hf --quick's (the patched model offline and streamed)."""
    (tmp_path / "drive.py").write_text(_STAGE_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, str(tmp_path / "drive.py"), ROOT], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["failed"] == []
    names = out["names"]
    # (the state kernel: 7 on that call, 4 now: output-only conv calls no longer launch it)
    conv_c446 = {"_causal_conv1d_state_fwd_kernel": 4, "_causal_conv1d_grp_fwd_kernel": 4,
                 "_causal_conv1d_dw_fwd_kernel": 2, "_causal_conv1d_state_scatter_kernel": 1,
                 "_causal_conv1d_grp_bwd_dx_kernel": 1, "_causal_conv1d_grp_bwd_dw_kernel": 1}
    for k, n in conv_c446.items():
        assert names.get(k, 0) >= n, (k, names)
    assert names.get("_decode_attention_fwd_kernel", 0) >= 3
    # bench_streaming's step_fixed: the ring write with the query queue (chunked) and without
    # (banded's later layers), and the residual queue
    assert names.get("_ring_write_kernel", 0) >= 2
    assert names.get("_residual_kernel", 0) >= 1
    # the encoder variant's step: its running GroupNorm's kernel (bf16, C = 512, 256 frames)
    # and its feature projection's LayerNorm (the transposed conv features, 4 frames)
    assert names.get("_running_norm_step_kernel", 0) >= 1, names
    assert names.get("_channel_norm_act_kernel", 0) >= 1, names
    # bench_hf --quick's pyencoder rows (the only attention launches of these stages): the
    # patched model's offline attention (layer 0 with lookahead, a later layer) and its stream
    assert names.get("_interval_attention_fwd_kernel", 0) >= 1, names
    assert names.get("_convnext_dwconv_ln_fwd_kernel", 0) >= 2
