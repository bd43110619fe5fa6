"""The device's own compiles brought back and carried next time (benchmarks/triton_cache.py,
benchmarks/gpu_session.py; issue 12).

- pack (gpu_session's flush_out): only the Triton entries that were not carried, each pruned as
  triton_cache.prune does (metadata .json + .cubin + a group file of bare names) on a copy (the
  live cache keeps every file and its absolute group paths), plus Inductor's FX graph /
  AOTAutograd files and *.best_config (not its triton/, locks/ or regenerated output code, not
  what was installed from the carry); over the size cap the largest entries go first;
- merge (CPU): matching key facts keep the entries in .triton-cache/device/ (union, idempotent),
  differing facts are refused naming the fields; build keeps device/;
- setup: device/ entries installed with group paths rewritten to the live folder, the Inductor
  files unpacked into TORCHINDUCTOR_CACHE_DIR; a broken device cache never fails setup;
- the session: entries installed from the carry count as carried (triton_cache_new is what a
  stage compiled), the archive is written only on change and $OUT stays within check_out.
"""
import argparse
import json
import os
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_session as gs  # noqa: E402
from benchmarks import triton_cache as tc  # noqa: E402
from conftest import has_triton  # noqa: E402

FACTS = {"triton": "3.6.0", "triton_key_sha256": "a" * 64, "backend_hash": "ptxas 12.9-90",
         "env_vars": {}, "target": ["cuda", 90, 32], "python": "3.12.3"}
ALL_FILES = (".json", ".cubin", ".ptx", ".ttir", ".source")


def _entry(cache, key, name, cubin_bytes=64):
    """A live Triton cache entry as the JIT leaves it: every stage's file, the group file listing
    them by absolute path; the cubin is random (incompressible) bytes."""
    d = cache / key
    d.mkdir(parents=True)
    for ext in ALL_FILES:
        data = os.urandom(cubin_bytes) if ext == ".cubin" else f"{name}{ext}".encode()
        (d / f"{name}{ext}").write_bytes(data)
    (d / f"__grp__{name}.json").write_text(json.dumps(
        {"child_paths": {f"{name}{e}": str(d / f"{name}{e}") for e in ALL_FILES}}))
    return d


def _inductor(ind):
    files = {"fxgraph/ab/fabc/entry0": b"fx", "aotautograd/aabc/entry0": b"aot",
             "xy/cxyz.best_config": b"{}"}
    skipped = {"triton/0/KEY/k.cubin": b"c", "locks/fx.lock": b"", "xy/cxyz.py": b"code",
               "fxgraph/ab/fabc/entry1.tmp": b"half"}
    for rel, data in {**files, **skipped}.items():
        (ind / rel).parent.mkdir(parents=True, exist_ok=True)
        (ind / rel).write_bytes(data)
    return sorted(files), sorted(skipped)


def _snapshot(folder):
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def _unpack(archive, dest):
    """device-cache.tgz -> {part: members}; the parts extracted under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as t:
        names = t.getnames()
        t.extractall(dest, filter="data")
    got = {"outer": sorted(names)}
    for part in (tc.ARCHIVE, tc.INDUCTOR_ARCHIVE):
        if (dest / part).exists():
            with tarfile.open(dest / part) as t:
                got[part] = sorted(m.name for m in t.getmembers() if m.isfile())
                t.extractall(dest / (part + ".d"), filter="data")
    got["info"] = json.load(open(dest / tc.DEVICE_INFO))
    return got


def test_pack_holds_only_the_new_entries_pruned_and_leaves_the_live_cache(tmp_path):
    cache, ind = tmp_path / "triton-cache", tmp_path / "inductor"
    _entry(cache, "CARRIED", "_carried_kernel")
    _entry(cache, "NEWONE", "_interval_attention_fwd_kernel")
    _entry(cache, "NEWTWO", "triton_per_fused_flex_attention_backward_0")
    (cache / "INCOMPLETE").mkdir()                      # no group file: being written
    (cache / "INCOMPLETE" / "x.cubin").write_bytes(b"x")
    kept, skipped = _inductor(ind)
    before = _snapshot(cache)
    info = tc.pack_device_cache(str(cache), {"CARRIED"}, str(ind), str(tmp_path / "dc.tgz"),
                                {"key_facts": FACTS, "gpu": "NVIDIA H200", "run_id": "r1"},
                                str(tmp_path / "scratch"))
    assert _snapshot(cache) == before                   # never prune the live folder
    assert not (tmp_path / "scratch").exists()
    got = _unpack(tmp_path / "dc.tgz", tmp_path / "x")
    assert got["outer"] == sorted([tc.ARCHIVE, tc.INDUCTOR_ARCHIVE, tc.DEVICE_INFO])
    ents = tmp_path / "x" / (tc.ARCHIVE + ".d")
    assert tc.entries(str(ents)) == {"NEWONE": "_interval_attention_fwd_kernel",
                                     "NEWTWO": "triton_per_fused_flex_attention_backward_0"}
    name = "_interval_attention_fwd_kernel"
    assert sorted(os.listdir(ents / "NEWONE")) == sorted(
        [f"__grp__{name}.json", f"{name}.cubin", f"{name}.json"])
    grp = json.load(open(ents / "NEWONE" / f"__grp__{name}.json"))["child_paths"]
    assert grp == {f"{name}.json": f"{name}.json", f"{name}.cubin": f"{name}.cubin"}
    assert (ents / "NEWONE" / f"{name}.cubin").read_bytes() == \
        (cache / "NEWONE" / f"{name}.cubin").read_bytes()
    assert got[tc.INDUCTOR_ARCHIVE] == kept, (got[tc.INDUCTOR_ARCHIVE], skipped)
    i = got["info"]
    assert i["entries"] == 2 and i["inductor_files"] == 3 and i["dropped_entries"] == 0
    assert i["kernels"] == {name: 1, "triton_per_fused_flex_attention_backward_0": 1}
    assert i["key_facts"] == FACTS and i["gpu"] == "NVIDIA H200" and i["run_id"] == "r1"
    assert i["pack_s"] >= 0


def test_pack_over_the_cap_drops_the_largest_entries_first(tmp_path):
    cache = tmp_path / "triton-cache"
    sizes = {"HUGE": 900_000, "BIG": 500_000, "MID": 200_000, "SMALL": 50_000, "TINY": 10_000}
    for key, n in sizes.items():
        _entry(cache, key, f"_k_{key.lower()}", n)
    limit = 900_000
    dest = tmp_path / "dc.tgz"
    info = tc.pack_device_cache(str(cache), set(), str(tmp_path / "no-inductor"), str(dest),
                                {"key_facts": FACTS}, str(tmp_path / "s"), limit=limit)
    assert dest.stat().st_size <= limit
    got = _unpack(dest, tmp_path / "x")
    kept = set(tc.entries(str(tmp_path / "x" / (tc.ARCHIVE + ".d"))))
    assert "HUGE" not in kept and {"SMALL", "TINY"} <= kept, kept
    dropped = set(sizes) - kept
    assert min(sizes[k] for k in dropped) >= max(sizes[k] for k in kept)  # largest first
    assert info["dropped_entries"] == len(dropped) == got["info"]["dropped_entries"]
    assert got["info"]["dropped_kernels"] == {f"_k_{k.lower()}": 1 for k in dropped}
    assert tc.INDUCTOR_ARCHIVE not in got["outer"]
    # an Inductor archive that cannot fit at all is left out, said so; the entries stay
    ind = tmp_path / "ind"
    (ind / "fxgraph" / "ab").mkdir(parents=True)
    (ind / "fxgraph" / "ab" / "big").write_bytes(os.urandom(300_000))
    info = tc.pack_device_cache(str(cache), {"HUGE", "BIG", "MID"}, str(ind), str(dest),
                                {"key_facts": FACTS}, str(tmp_path / "s"), limit=200_000)
    assert "inductor_dropped" in info and info["inductor_files"] == 0
    assert info["entries"] == 2 and dest.stat().st_size <= 200_000


def _device_archive(tmp_path, name, entries, facts=FACTS, run_id=None, inductor=None):
    cache = tmp_path / f"live-{name}"
    cache.mkdir()
    for key, kname in entries.items():
        _entry(cache, key, kname)
    ind = tmp_path / f"ind-{name}"
    for rel, data in (inductor or {}).items():
        (ind / rel).parent.mkdir(parents=True, exist_ok=True)
        (ind / rel).write_bytes(data)
    dest = tmp_path / f"{name}.tgz"
    tc.pack_device_cache(str(cache), set(), str(ind), str(dest),
                         {"key_facts": facts, "gpu": "NVIDIA H100 80GB HBM3",
                          "run_id": run_id or name, "torch": "2.11.0+cu130"},
                         str(tmp_path / f"s-{name}"))
    return dest


def _built(out, facts=FACTS):
    out.mkdir(parents=True, exist_ok=True)
    (out / tc.BUILD_INFO).write_text(json.dumps(dict(facts, entries=0)))
    _entry(out, "CPUKEY", "_cpu_kernel")
    tc.pack(str(out))


def _device_entries(out):
    with tarfile.open(out / tc.DEVICE_DIR / tc.ARCHIVE) as t:
        return sorted({m.name.split("/")[0] for m in t.getmembers()})


def test_merge_unions_the_device_entries_and_is_idempotent(tmp_path, capsys):
    out = tmp_path / ".triton-cache"
    _built(out)
    cpu = (out / tc.ARCHIVE).read_bytes()
    a = _device_archive(tmp_path, "a", {"K1": "_k1", "K2": "triton_poi_fused_0"},
                        inductor={"fxgraph/ab/f1/e": b"one", "aotautograd/a1/e": b"aot"})
    b = _device_archive(tmp_path, "b", {"K2": "triton_poi_fused_0", "K3": "_k3"},
                        inductor={"fxgraph/cd/f2/e": b"two", "fxgraph/ab/f1/e": b"one!"})
    assert tc.main(["merge", str(a), "--out", str(out), "--no-keep"]) == 0
    assert _device_entries(out) == ["K1", "K2"]
    assert "2 new device entries" in capsys.readouterr().out
    tc.merge(str(b), str(out))
    assert _device_entries(out) == ["K1", "K2", "K3"]
    first = _snapshot(out / tc.DEVICE_DIR)
    info = tc.merge(str(b), str(out))                  # again: nothing changes
    assert _device_entries(out) == ["K1", "K2", "K3"]
    assert info["entries"] == 3 and info["kernels"] == {"_k1": 1, "_k3": 1,
                                                        "triton_poi_fused_0": 1}
    assert [c["run_id"] for c in info["calls"]] == ["a", "b"]
    assert info["key_facts"] == FACTS and info["inductor_files"] == 3
    again = _snapshot(out / tc.DEVICE_DIR)
    assert set(again) == set(first) and again[tc.DEVICE_INFO] == first[tc.DEVICE_INFO]
    with tarfile.open(out / tc.DEVICE_DIR / tc.INDUCTOR_ARCHIVE) as t:
        assert sorted(m.name for m in t.getmembers() if m.isfile()) == [
            "aotautograd/a1/e", "fxgraph/ab/f1/e", "fxgraph/cd/f2/e"]
        assert t.extractfile("fxgraph/ab/f1/e").read() == b"one!"   # the newer call's
    assert (out / tc.ARCHIVE).read_bytes() == cpu                      # the build untouched
    assert sorted(os.listdir(out)) == sorted([tc.ARCHIVE, tc.BUILD_INFO, tc.DEVICE_DIR])


def test_merge_refuses_other_key_facts_naming_the_fields(tmp_path, capsys):
    out = tmp_path / ".triton-cache"
    _built(out)
    good = _device_archive(tmp_path, "good", {"K1": "_k1"})
    tc.merge(str(good), str(out))
    before = _snapshot(out)
    other = dict(FACTS, triton_key_sha256="b" * 64, backend_hash="ptxas 13.0-90")
    bad = _device_archive(tmp_path, "bad", {"K9": "_k9"}, facts=other)
    with pytest.raises(ValueError, match=r"differ .*\(triton_key_sha256, backend_hash\)"):
        tc.merge(str(bad), str(out))
    assert tc.main(["merge", str(bad), "--out", str(out), "--keep",
                    str(tmp_path / "kept")]) == 1
    assert not (tmp_path / "kept").exists()           # a refused merge mirrors nothing
    err = capsys.readouterr().err
    assert "refusing" in err and 'backend_hash: built "ptxas 12.9-90", device "ptxas 13.0-90"' \
        in err
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match="build_info.json is not readable"):
        tc.merge(str(good), str(tmp_path / "no-build"))
    with pytest.raises(SystemExit):
        tc.main(["merge", str(tmp_path / "absent.tgz"), "--out", str(out)])
    assert "archive" in capsys.readouterr().err


def test_merge_mirrors_device_into_the_committed_copy_and_seed_restores_it(tmp_path, capsys):
    """A session's machine starts without .triton-cache/: merge (the command) mirrors device/
    into the tracked folder, and seed gives a fresh machine's .triton-cache/ the same device/."""
    out, kept = tmp_path / ".triton-cache", tmp_path / "committed"
    _built(out)
    a = _device_archive(tmp_path, "a", {"K1": "_k1"}, inductor={"fxgraph/ab/f1/e": b"one"})
    b = _device_archive(tmp_path, "b", {"K2": "_k2"})
    assert tc.main(["merge", str(a), "--out", str(out), "--keep", str(kept)]) == 0
    assert "commit it" in capsys.readouterr().out
    assert _snapshot(kept) == _snapshot(out / tc.DEVICE_DIR)
    (kept / "stale.bin").write_bytes(b"x")             # not a device/ file: left alone
    assert tc.main(["merge", str(b), "--out", str(out), "--keep", str(kept)]) == 0
    dev = _snapshot(out / tc.DEVICE_DIR)
    assert {k: v for k, v in _snapshot(kept).items() if k != "stale.bin"} == dev
    assert _device_entries(out) == ["K1", "K2"]
    fresh = tmp_path / "fresh" / ".triton-cache"      # the next session's machine
    assert tc.main(["seed", "--out", str(fresh), "--from", str(kept)]) == 0
    assert _snapshot(fresh / tc.DEVICE_DIR) == dev
    assert "2 Triton entries, 1 Inductor files, from 2 call(s)" in capsys.readouterr().out
    # an existing device/ is never overwritten; no committed copy: nothing happens
    (fresh / tc.DEVICE_DIR / tc.DEVICE_INFO).write_text("{}")
    assert tc.seed(str(fresh), str(kept)) == 0
    assert (fresh / tc.DEVICE_DIR / tc.DEVICE_INFO).read_text() == "{}"
    assert tc.seed(str(tmp_path / "other"), str(tmp_path / "nothing")) == 0
    assert not (tmp_path / "other").exists()
    # a device/ losing a file (e.g. no Inductor files) loses it in the copy too
    os.remove(out / tc.DEVICE_DIR / tc.INDUCTOR_ARCHIVE)
    tc.keep_committed(str(out), str(kept))
    assert not (kept / tc.INDUCTOR_ARCHIVE).exists() and (kept / tc.ARCHIVE).exists()


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_build_keeps_the_device_folder(tmp_path, monkeypatch, capsys):
    """build() replaces the cache folder with its new staging folder: device/ must move along."""
    out = tmp_path / ".triton-cache"
    _built(out)
    tc.merge(str(_device_archive(tmp_path, "a", {"K1": "_k1", "K2": "triton_poi_0"},
                                 inductor={"fxgraph/ab/f/e": b"x"})), str(out))
    dev = _snapshot(out / tc.DEVICE_DIR)

    def fake_run(argv, cwd=None, env=None):      # the capture subprocess: no launches
        req = argv[argv.index("--requests") + 1]
        with open(req, "w") as f:
            json.dump({"requests": [], "counter": {"compiles": 0}, "not_captured": []}, f)
        return argparse.Namespace(returncode=0)
    monkeypatch.setattr(tc.subprocess, "run", fake_run)
    monkeypatch.setattr(tc, "key_facts", lambda target=tc.TARGET: dict(FACTS))
    info = tc.build(str(out), "gpu_quick", [], 1, bench=False)
    assert info["device_entries_kept"] == 2
    assert _snapshot(out / tc.DEVICE_DIR) == dev
    assert (out / tc.BUILD_INFO).exists() and not (out.parent / ".triton-cache.staging").exists()
    text = capsys.readouterr().out
    assert "device/ kept: 2 device entries (1 of this project's kernels" in text
    assert "0 stale by key facts" in text
    monkeypatch.setattr(tc, "key_facts",
                        lambda target=tc.TARGET: dict(FACTS, triton="3.7.0"))
    tc.build(str(out), "gpu_quick", [], 1, bench=False)
    assert _snapshot(out / tc.DEVICE_DIR) == dev
    assert "2 stale by key facts (differs: triton)" in capsys.readouterr().out


def test_setup_installs_the_device_entries_and_inductor_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tc, "key_facts", lambda target=tc.TARGET: dict(FACTS))
    monkeypatch.setattr(tc, "device_target", lambda: None)
    monkeypatch.setattr(tc, "_gpu_name", lambda: "NVIDIA H200")
    carried = tmp_path / ".triton-cache"
    _built(carried)
    (carried / tc.ARCHIVE).unlink()
    tc.merge(str(_device_archive(tmp_path, "a", {"K1": "_k1", "K2": "_k2"},
                                 inductor={"fxgraph/ab/f/e": b"fx", "xy/c.best_config": b"{}"})),
             str(carried))
    cache, ind = tmp_path / "live", tmp_path / "inductor"
    rep = tc.setup(str(carried), str(cache), str(tmp_path / "rep.json"), str(ind))
    dev = rep["device_cache"]
    assert dev["installed"] == 2 and dev["inductor_files"] == 2, dev
    assert rep["entries_after_install"] == 2
    grp = json.load(open(cache / "K1" / "__grp___k1.json"))["child_paths"]
    assert grp == {"_k1.json": str(cache / "K1" / "_k1.json"),
                   "_k1.cubin": str(cache / "K1" / "_k1.cubin")}
    assert all(os.path.isfile(p) for p in grp.values())
    assert (ind / "fxgraph" / "ab" / "f" / "e").read_bytes() == b"fx"
    assert (ind / "xy" / "c.best_config").exists()
    assert dev["verdict"].startswith("key matches; its FX graph / AOTAutograd entries were made "
                                     "on a NVIDIA H100 80GB HBM3 and miss on this NVIDIA H200")
    assert json.load(open(tmp_path / "rep.json"))["device_cache"]["installed"] == 2
    assert "2 entries, 2 Inductor files installed" in capsys.readouterr().out
    # a broken carried archive: reported, the device's own entries still installed (it raised
    # before install_device ran)
    (carried / tc.ARCHIVE).write_bytes(b"not a tar")
    rep = tc.setup(str(carried), str(tmp_path / "live1"), None, str(tmp_path / "ind1"))
    assert rep["installed"] == 0 and "not installed" in rep["verdict"], rep
    assert rep["device_cache"]["installed"] == 2
    (carried / tc.ARCHIVE).unlink()
    # a broken device archive: reported, setup still succeeds
    (carried / tc.DEVICE_DIR / tc.ARCHIVE).write_bytes(b"not a tar")
    rep = tc.setup(str(carried), str(tmp_path / "live2"), None, str(tmp_path / "ind2"))
    assert rep["device_cache"]["installed"] == 0 and "entries" in rep["device_cache"]["error"]
    assert rep["device_cache"]["inductor_files"] == 2
    rep = tc.setup(str(tmp_path / "nothing"), str(tmp_path / "live3"), None, str(ind))
    assert rep["device_cache"] == {"carried": False}


def _session(tmp_path):
    args = argparse.Namespace(dry_run=True, out=str(tmp_path / "out"), work=str(tmp_path / "w"),
                              budget=1000, autotune=False, workers=1, timeout_scale=1.0,
                              triton_cache=str(tmp_path / "none"))
    return gs.Session(args)


_COMPILE = """
import json, os, sys
d = os.path.join(os.environ['TRITON_CACHE_DIR'], sys.argv[1])
os.makedirs(d)
for e in ('.json', '.cubin', '.ptx'):
    open(os.path.join(d, sys.argv[2] + e), 'w').write(e)
json.dump({'child_paths': {sys.argv[2] + e: os.path.join(d, sys.argv[2] + e)
                           for e in ('.json', '.cubin', '.ptx')}},
          open(os.path.join(d, '__grp__' + sys.argv[2] + '.json'), 'w'))
if len(sys.argv) > 3:
    p = os.path.join(os.environ['TORCHINDUCTOR_CACHE_DIR'], 'fxgraph', 'ab', sys.argv[3])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, 'w').write('graph')
"""

_INSTALL = ("import os, sys; from benchmarks import triton_cache as tc; "
            "tc.install_device(sys.argv[1], os.environ['TRITON_CACHE_DIR'], "
            "os.environ['TORCHINDUCTOR_CACHE_DIR'])")


def test_session_packs_what_a_stage_compiled_on_change_only(tmp_path):
    carried = tmp_path / ".triton-cache"
    _built(carried)
    tc.merge(str(_device_archive(tmp_path, "a", {"DEVKEY": "_dev_kernel"},
                                 inductor={"fxgraph/ab/old": b"carried"})), str(carried))
    s = _session(tmp_path)
    assert s.env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "w" / "inductor-cache")
    _entry(tmp_path / "w" / "triton-cache", "WARMKEY", "_warm")  # an earlier call's compile
    s = _session(tmp_path)
    rec = s.run_stage("setup", 60, lambda ctx: [
        ("install", [sys.executable, "-c", _INSTALL, str(carried)], {})])
    assert rec["status"] == "ok" and rec["triton_cache_new"] == 0, rec   # installed = carried
    assert rec["triton_cache_entries"] == 2
    s.flush_out()
    out = tmp_path / "out"
    assert not (out / tc.DEVICE_ARCHIVE).exists()      # nothing compiled here yet
    rec = s.run_stage("attention_ext", 60, lambda ctx: [
        ("compile", [sys.executable, "-c", _COMPILE, "NEWKEY", "triton_poi_fused_0",
                     "fnew"], {})])
    assert rec["triton_cache_new"] == 1, rec
    assert rec["triton_cache_new_by_kernel"] == {"triton_poi_fused_0": 1}
    s.flush_out()
    assert gs.check_out(str(out)) == []
    got = _unpack(out / tc.DEVICE_ARCHIVE, tmp_path / "x1")
    assert got[tc.ARCHIVE] == sorted(["NEWKEY/__grp__triton_poi_fused_0.json",
                                      "NEWKEY/triton_poi_fused_0.cubin",
                                      "NEWKEY/triton_poi_fused_0.json"])
    assert got[tc.INDUCTOR_ARCHIVE] == ["fxgraph/ab/fnew"]           # not the carried file
    assert got["info"]["dry_run"] is True and got["info"]["key_facts_from"]
    assert s.summary["device_cache"]["entries"] == 1
    mtime = (out / tc.DEVICE_ARCHIVE).stat().st_mtime_ns
    rec = s.run_stage("conv", 60, lambda ctx: [("nothing", [sys.executable, "-c", "0"], {})])
    assert rec["triton_cache_new"] == 0
    s.flush_out()
    assert (out / tc.DEVICE_ARCHIVE).stat().st_mtime_ns == mtime      # no change: no pack
    rec = s.run_stage("convnext_hf", 60, lambda ctx: [
        ("compile", [sys.executable, "-c", _COMPILE, "CONVKEY", "_conv_kernel"], {})])
    assert rec["triton_cache_new_by_kernel"] == {"_conv_kernel": 1}
    s.flush_out()
    got = _unpack(out / tc.DEVICE_ARCHIVE, tmp_path / "x2")
    assert got["info"]["kernels"] == {"_conv_kernel": 1, "triton_poi_fused_0": 1}
    s.session_log.close()
    log = open(out / "session.log").read()
    assert log.count("Inductor cache files -> device-cache.tgz") == 2
    assert "device compiles of earlier calls" not in log or "1 Triton entries" in log
    assert sorted(os.listdir(out)) == sorted(["session.log", "summary.json", "logs.tgz",
                                              tc.DEVICE_ARCHIVE])
    # the live cache keeps its full entries and absolute group paths
    live = tmp_path / "w" / "triton-cache" / "NEWKEY"
    assert sorted(os.listdir(live)) == sorted(["__grp__triton_poi_fused_0.json",
                                               "triton_poi_fused_0.cubin",
                                               "triton_poi_fused_0.json",
                                               "triton_poi_fused_0.ptx"])
