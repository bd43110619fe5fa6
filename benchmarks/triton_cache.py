"""Prebuild Triton's on-disk kernel cache for the GPU session on a machine without a GPU, and
install and check it on the device (benchmarks/gpu_prep.sh step 4, benchmarks/gpu_session.py).

    python -m benchmarks.triton_cache build [--out .triton-cache] [--tier gpu_quick]
                                            [--jobs N] [--autotune 0|1] [pytest files ...]
    python -m benchmarks.triton_cache verify [--cache .triton-cache] [same selection as build]
    python -m benchmarks.triton_cache facts [--target cuda 90 32]   # this Triton's cache key
    python -m benchmarks.triton_cache merge <files_at>/device-cache.tgz [--out .triton-cache]

What the cache is: triton.compile files a compiled kernel under
sha256(get_cache_key(src, backend, options, env)) = triton_key() (Triton's own sources and its
libtriton .so, which differs per Python version) + the source's hash (function source and line,
signature, constexprs, specialisation attributes) + backend.hash() (the bundled ptxas version and
the arch) + the options' hash + the cache-invalidating env vars. So the cache must be built with
the same Triton wheel for the same Python as the device's: gpu_prep.sh runs this in its Python 3.12
build venv with torch 2.11.0's triton 3.6.0.

build:
  1. capture (one subprocess): the tier's tests (default the gpu_quick tests of the session's
     stage files, autotuner pinned as the session runs it), then the attention_table stage's
     pyencoder-triton cases (bench_attention.make_provider at wav2vec2-base, bf16, every N, mask
     and RoPE setting) and the other benchmark stages' Triton launches at their GPU shapes
     (bench_conv / bench_convnext --quick, bench_streaming's step_fixed: _bench_stage_launches;
     --no-bench leaves all of these out) run as in tests/_count_compiles.py (CPU
     tensors stand in for CUDA ones, the sm90 row of the attention tile table), but every launch
     goes through Triton's own JITFunction.run with a driver that reports GPUTarget("cuda", 90, 32):
     the JIT binds and specialises the arguments with the CUDA backend and reaches _do_compile
     with the exact signature, constexprs, attributes and options it would compile on the device;
     there the request is recorded (Triton's specialisation_data and the cache hash computed from
     those objects) instead of compiled;
  2. compile ($GPU_PREP_JOBS processes): JITFunction.preload(specialisation_data), the JIT's own
     path from a recorded request to triton.compile(ASTSource, target, options), with
     TRITON_CACHE_DIR at the staging folder; each compiled kernel's hash must equal the recorded
     one (a request that does not reproduce is reported, not kept);
     a request whose entry the previous cache at --out already holds (same key facts, same
     hash: nothing that decides the binary changed) is copied from its entries.tgz instead
     (--no-reuse compiles everything): after an edit only the edited kernels compile again;
  3. prune: each entry keeps what loading a kernel reads (CompiledKernel reads every file its
     group lists: the metadata .json and the .cubin suffice; the .source/.ttir/.ttgir/.llir/.ptx
     are dropped) and its group file lists bare file names (the device rewrites them to absolute
     paths when it installs the cache: Triton drops group entries whose path does not exist);
     the entries are packed into one entries.tgz (cubins compress about 4x);
  4. build_info.json: the key facts (Triton version, sha256 of triton_key(), backend hash,
     cache-invalidating env vars, target) and per-kernel entry counts, sizes and times.
verify: installs the packed cache into a temporary folder as the device does and replays the same
launches through the JIT, compiling for real against it on the fake driver (nothing launched): every
kernel must load from the cache; a miss is counted by kernel name instead of compiled.
On the device, install() unpacks the entries into $TRITON_CACHE_DIR with their group files
rewritten, and compare() says "cache key matches" or "mismatch: compiling" with what differs; a
mismatch only costs the compiles (the entries are never hit).

The device's own compiles (what the CPU build cannot foresee or make: Inductor's kernels for
FlexAttention and the compiled anchors, which Inductor generates only on the GPU, and launches
the capture misses). gpu_session.py runs every stage with TORCHINDUCTOR_CACHE_DIR=
<work>/inductor-cache beside TRITON_CACHE_DIR (torch 2.11: its FX graph cache is fxgraph/, its
AOTAutograd cache aotautograd/ there; Inductor's Triton kernels go to TRITON_CACHE_DIR when that
is set) and, after every stage where something new appeared, writes $OUT/device-cache.tgz
(pack_device_cache): the Triton entries not carried, copied and pruned as above, as entries.tgz;
Inductor's fxgraph/, aotautograd/ and *.best_config files (inductor.tgz; not triton/, locks/ or
the output code a hit regenerates, nor what setup installed); device_cache_info.json (the
device's key facts, GPU, torch, run, entry counts by kernel); at most DEVICE_CACHE_LIMIT bytes
(the largest entries dropped first, said in the info and the log).
merge: keeps such an archive in .triton-cache/device/ (entries.tgz, inductor.tgz, the info),
in union with what earlier merges left (by entry folder; Inductor files by path, newer wins), when
its key facts match build_info.json's (else refused, naming the fields); build moves device/
into its new folder (stale entries, e.g. of an edited kernel, are never hit: harmless; counted),
and setup installs device/ after the build's entries (group files rewritten, the Inductor files
unpacked into TORCHINDUCTOR_CACHE_DIR). Every session starts on a fresh machine, so the merge
command also mirrors device/ into benchmarks/device_cache/ (committed; --no-keep skips it) and
seed (run by gpu_prep.sh) restores .triton-cache/device/ from there. The FX graph and
AOTAutograd keys hold the GPU's name (CacheBase.get_system): entries from an H100 miss on an H200, while the Triton entries, keyed by
the arch (sm_90), hit on both.

Limits: tests that draw random sizes (random chunk splits) launch specialisations that vary per
run: a few such launches may miss on the device (2 conv kernels of ~225 in one replay here once;
none of 418 since test_models draws its GPU chunks from a fixed generator); the
capture sees what tests/_count_compiles.py sees (a launch after a plain `assert` on
values is missed; conv calls that a GPU with pyencoder._C runs in CUDA are captured as Triton
launches and compiled needlessly); the kernels' sources must not change between the build and the
call (the source hash changes, the entry misses).
"""
import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = ("cuda", 90, 32)
BUILD_INFO = "build_info.json"
ARCHIVE = "entries.tgz"
KEEP_EXT = (".json", ".cubin")
KEY_FIELDS = ("triton", "triton_key_sha256", "backend_hash", "env_vars")


def _session_test_files():
    from benchmarks import gpu_session as gs
    return gs.ATTENTION_TESTS + ["tests/test_conv_gpu.py"] + gs.STREAMING_TESTS + \
        gs.CONVNEXT_TESTS


# ------------------------------------------------------------------------------------------------
# Key facts, entries, install (the device side; no GPU needed)
# ------------------------------------------------------------------------------------------------

def key_facts(target=TARGET):
    """What this process's Triton puts in every cache key for `target` (backend, arch, warp)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key
    return {"triton": triton.__version__,
            "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest(),
            "backend_hash": make_backend(GPUTarget(*target)).hash(),
            "env_vars": dict(get_cache_invalidating_env_vars()),
            "target": list(target),
            "python": ".".join(map(str, sys.version_info[:3]))}


def compare(built, here):
    """[] when a cache built with key facts `built` is hit by a process with key facts `here`,
    else the differing fields (the Python version only matters through triton_key's .so hash)."""
    return [k for k in KEY_FIELDS + ("target",) if (built or {}).get(k) != here.get(k)]


def entries(cache_dir):
    """{entry folder: kernel name} of the complete entries (those with a group file)."""
    out = {}
    if not os.path.isdir(cache_dir):
        return out
    for key in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, key)
        if not os.path.isdir(d):
            continue
        for f in os.listdir(d):
            if f.startswith("__grp__") and f.endswith(".json"):
                out[key] = f[len("__grp__"):-len(".json")]
                break
    return out


def _rewrite_group(path, base):
    """Point the group file's children at `base`/<file name> (bare names when base is None),
    keeping only KEEP_EXT; returns the kept names."""
    with open(path) as f:
        children = json.load(f)["child_paths"]
    keep = {c: (os.path.join(base, os.path.basename(p)) if base else os.path.basename(p))
            for c, p in children.items() if c.endswith(KEEP_EXT)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"child_paths": keep}, f)
    os.replace(tmp, path)
    return keep


def prune(cache_dir):
    """Keep in every entry only the metadata .json, the .cubin and the group file (listing bare
    names); drop incomplete entries and Triton's temporary folders. Returns the bytes left."""
    total = 0
    for key in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, key)
        if not os.path.isdir(d):
            continue
        grp = [f for f in os.listdir(d) if f.startswith("__grp__")]
        if not grp:
            shutil.rmtree(d)
            continue
        keep = set(_rewrite_group(os.path.join(d, grp[0]), None).values()) | {grp[0]}
        for f in os.listdir(d):
            p = os.path.join(d, f)
            if f not in keep:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            else:
                total += os.path.getsize(p)
    return total


def pack(cache_dir):
    """Move the entries of `cache_dir` into one gzip tar, cache_dir/entries.tgz (cubins shrink
    about 4x: the call's carry is limited); returns its size."""
    keys = list(entries(cache_dir))
    path = os.path.join(cache_dir, ARCHIVE)
    with tarfile.open(path + ".tmp", "w:gz") as t:
        for key in keys:
            t.add(os.path.join(cache_dir, key), arcname=key)
    os.replace(path + ".tmp", path)
    for key in keys:
        shutil.rmtree(os.path.join(cache_dir, key))
    return os.path.getsize(path)


def install(src, dst):
    """Put the carried entries of `src` (entries.tgz, or entry folders) into the Triton cache
    folder `dst` with their group files pointing at their new place; returns how many."""
    os.makedirs(dst, exist_ok=True)
    archive = os.path.join(src, ARCHIVE)
    if os.path.isfile(archive):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() or m.isdir()]
            keys = sorted({m.name.split("/")[0] for m in members})
            t.extractall(dst, members=members, filter="data")
    else:
        keys = list(entries(src))
        for key in keys:
            shutil.copytree(os.path.join(src, key), os.path.join(dst, key), dirs_exist_ok=True)
    n = 0
    for key in keys:
        d = os.path.join(dst, key)
        grp = [f for f in os.listdir(d) if f.startswith("__grp__")] if os.path.isdir(d) else []
        for f in grp:
            _rewrite_group(os.path.join(d, f), d)
        n += bool(grp)
    return n


def device_target():
    """The GPUTarget tuple of this process's GPU, or None without one."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from triton.runtime.driver import driver
        t = driver.active.get_current_target()
        return (t.backend, t.arch, t.warp_size)
    except Exception:
        return None


def _gpu_name():
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def setup(carried, cache_dir, report_path=None, inductor_dir=None):
    """The GPU session's setup step: compare the carried cache's key facts with this process's,
    install it into `cache_dir` ($TRITON_CACHE_DIR of every later stage), then the device's own
    compiles of earlier calls (`carried`/device/, merge's folder: Triton entries into `cache_dir`,
    Inductor files into `inductor_dir`) and report. Never fails for a missing, broken or
    mismatched cache: that only costs the compiles."""
    rep = {"cache_dir": cache_dir, "carried": os.path.isdir(carried)}
    try:
        built = json.load(open(os.path.join(carried, BUILD_INFO)))
    except (OSError, ValueError):
        built = None
    tgt = device_target()
    rep["target_source"] = "device" if tgt else "no GPU here: the build's target assumed"
    tgt = tgt or tuple((built or {}).get("target") or TARGET)
    here = key_facts(tgt)
    rep["built"] = {k: (built or {}).get(k) for k in KEY_FIELDS + ("target", "python")}
    rep["device"] = here
    if built is None:
        rep["verdict"] = "no cache carried: compiling"
    else:
        diff = compare(built, here)
        rep["differs"] = diff
        rep["verdict"] = "cache key matches" if not diff else \
            f"mismatch: compiling (differs: {', '.join(diff)})"
        try:   # a broken archive costs its compiles, not the device's own entries below
            rep["installed"] = install(carried, cache_dir)
        except Exception as e:
            rep["installed"] = 0
            rep["install_error"] = f"{type(e).__name__}: {e}"
            rep["verdict"] += f"; not installed ({rep['install_error']})"
        rep["carried_entries"] = (built or {}).get("entries")
    os.makedirs(cache_dir, exist_ok=True)
    dev = install_device(carried, cache_dir, inductor_dir)
    rep["device_cache"] = dev
    if dev.get("carried"):
        gpu = _gpu_name()
        dev["gpu_here"] = gpu
        dev["differs"] = compare(dev.get("key_facts"), here)
        dev["verdict"] = ("key matches" if not dev["differs"] else
                          f"mismatch (differs: {', '.join(dev['differs'])})") + (
            "" if gpu is None or gpu == dev.get("gpu") else
            f"; its FX graph / AOTAutograd entries were made on a {dev.get('gpu')} and miss on "
            f"this {gpu} (their key holds the GPU name); its Triton entries still hit")
        print(f"triton cache, device compiles of earlier calls: {dev['verdict']}; "
              f"{dev.get('installed', 0)} entries, {dev.get('inductor_files', 0)} Inductor files "
              f"installed{' (' + dev['error'] + ')' if dev.get('error') else ''}", flush=True)
    rep["entries_after_install"] = len(entries(cache_dir))
    for k in ("triton", "triton_key_sha256", "backend_hash", "env_vars", "target"):
        print(f"triton cache {k:18s} built {json.dumps(rep['built'].get(k))}  "
              f"here {json.dumps(here.get(k))}")
    print(f"triton cache: {rep['verdict']}; {rep.get('installed', 0)} entries installed into "
          f"{cache_dir}", flush=True)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


# ------------------------------------------------------------------------------------------------
# The device's own compiles, brought back (gpu_session packs them; merge keeps them here)
# ------------------------------------------------------------------------------------------------

DEVICE_DIR = "device"                       # .triton-cache/device/: what merge keeps
DEVICE_ARCHIVE = "device-cache.tgz"         # the $OUT file gpu_session writes
INDUCTOR_ARCHIVE = "inductor.tgz"
DEVICE_INFO = "device_cache_info.json"
DEVICE_CACHE_LIMIT = 15 * 2**20             # $OUT allows 16 MiB a file
# what hits Inductor's caches on a later call: the FX graph and AOTAutograd entries (in torch
# 2.11 an FX graph entry also bundles the Triton files of its kernels) and the runtime
# autotuner's *.best_config files; the rest is regenerated on a hit (the output code under
# <2 chars>/) or is not a cache (locks/); triton/ is Triton's cache when TRITON_CACHE_DIR is unset
INDUCTOR_KEEP_DIRS = ("fxgraph", "aotautograd")
INDUCTOR_SKIP_DIRS = ("triton", "locks")


def inductor_files(inductor_dir):
    """The files of an Inductor cache folder (TORCHINDUCTOR_CACHE_DIR) that a later call needs
    to hit the FX graph and AOTAutograd caches (and skip re-autotuning): {relative path:
    (size, mtime_ns)}."""
    out = {}
    if not inductor_dir or not os.path.isdir(inductor_dir):
        return out
    for dirpath, dirnames, filenames in os.walk(inductor_dir):
        rel = os.path.relpath(dirpath, inductor_dir)
        top = rel.split(os.sep)[0]
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in INDUCTOR_SKIP_DIRS]
        for f in filenames:
            if f.endswith((".tmp", ".lock")) or (top not in INDUCTOR_KEEP_DIRS
                                                 and not f.endswith(".best_config")):
                continue
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[os.path.normpath(os.path.join(rel, f))] = (st.st_size, st.st_mtime_ns)
    return out


def _tar_files(path, base, names):
    with tarfile.open(path + ".tmp", "w:gz", compresslevel=6) as t:   # ~9's size, far faster
        for n in sorted(names):
            t.add(os.path.join(base, n), arcname=n)
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def pack_device_cache(cache_dir, carried, inductor_dir, dest, info, scratch,
                      limit=DEVICE_CACHE_LIMIT, inductor_carried=None):
    """Write `dest` (a gzip tar: entries.tgz, inductor.tgz, device_cache_info.json) with the
    entries of the live Triton cache `cache_dir` that are not in `carried` (copied to `scratch`
    and pruned there: the live folder keeps its files) and the Inductor cache files a later call
    hits (inductor_files) that are not in `inductor_carried` ({path: (size, mtime_ns)} as
    installed). Over `limit` bytes the largest Triton entries go first (the Inductor archive
    only when it alone cannot fit); `info` (key facts, GPU, versions, run) gets the counts and
    what was dropped. Returns the info written."""
    t0 = time.monotonic()
    shutil.rmtree(scratch, ignore_errors=True)
    stage = os.path.join(scratch, "entries")
    os.makedirs(stage)
    new = {k: v for k, v in entries(cache_dir).items() if k not in carried}
    def unkept(_, names):          # prune drops them anyway: do not copy them
        return [n for n in names if not (n.endswith(KEEP_EXT) or n.startswith("__grp__"))]
    for key in new:
        try:
            shutil.copytree(os.path.join(cache_dir, key), os.path.join(stage, key), ignore=unkept)
        except OSError:            # an entry Triton is rewriting: the next pack takes it
            shutil.rmtree(os.path.join(stage, key), ignore_errors=True)
    prune(stage)
    sizes = {k: _folder_bytes(os.path.join(stage, k)) for k in entries(stage)}
    ind = {k: v for k, v in inductor_files(inductor_dir).items()
           if (inductor_carried or {}).get(k) != v}
    ind_path = os.path.join(scratch, INDUCTOR_ARCHIVE)
    ind_bytes = _tar_files(ind_path, inductor_dir, ind) if ind else 0
    info = dict(info)
    dropped, dropped_kernels = [], collections.Counter()
    budget = limit - 64 * 1024                 # the info json and the tar headers
    if ind_bytes > budget:                     # it cannot fit whatever the entries
        info["inductor_dropped"] = f"{ind_bytes} bytes packed > the {limit} byte cap"
        os.remove(ind_path)
        ind, ind_bytes = {}, 0
    ent_path = os.path.join(scratch, ARCHIVE)
    while True:
        keys = sorted(sizes)
        ent_bytes = _tar_files(ent_path, stage, keys) if keys else 0
        over = ent_bytes + ind_bytes - budget
        if over <= 0:
            break
        # drop the largest entries until the estimated packed size fits (ratio of this pack)
        ratio = ent_bytes / max(1, sum(sizes.values()))
        cut = 0
        for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
            if cut * ratio >= over * 1.05 and cut:
                break
            cut += sizes.pop(key)
            dropped.append(key)
            dropped_kernels[new[key]] += 1
            shutil.rmtree(os.path.join(stage, key))
    kept = {k: new[k] for k in sizes}
    info.update(entries=len(kept), kernels=dict(sorted(collections.Counter(kept.values()).items())),
                entry_bytes=sum(sizes.values()), entries_archive_bytes=ent_bytes,
                inductor_files=len(ind), inductor_archive_bytes=ind_bytes,
                dropped_entries=len(dropped), dropped_kernels=dict(sorted(dropped_kernels.items())))
    info["pack_s"] = round(time.monotonic() - t0, 2)
    info_path = os.path.join(scratch, DEVICE_INFO)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    parts = [DEVICE_INFO] + ([ARCHIVE] if sizes else []) + ([INDUCTOR_ARCHIVE] if ind else [])
    tmp = dest + ".tmp"
    with tarfile.open(tmp, "w:gz", compresslevel=1) as t:
        for p in parts:
            t.add(os.path.join(scratch, p), arcname=p)
    os.replace(tmp, dest)
    shutil.rmtree(scratch, ignore_errors=True)
    info["bytes"] = os.path.getsize(dest)
    info["pack_s"] = round(time.monotonic() - t0, 2)
    return info


def _read_member(t, name):
    try:
        m = t.getmember(name)
    except KeyError:
        return None
    return t.extractfile(m).read()


def merge(archive, out):
    """Keep the device's compiles of `archive` (a device-cache.tgz) in `out`/device/: the Triton
    entries (union by entry folder with what an earlier merge left), the Inductor files (union by
    path, the newer call's file wins) and the info of every call merged. Refuses (ValueError
    naming the differing fields) when the device's key facts differ from `out`/build_info.json's:
    its entries would never be hit. Returns the merged info."""
    import tempfile
    out = os.path.abspath(out)
    try:
        with open(os.path.join(out, BUILD_INFO)) as f:
            built = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"merge: {os.path.join(out, BUILD_INFO)} is not readable ({e}); the "
                         "device entries are kept beside a built cache: build it first") from e
    with tarfile.open(archive) as t:
        raw = _read_member(t, DEVICE_INFO)
        if raw is None:
            raise ValueError(f"merge: {archive} has no {DEVICE_INFO}: not a device cache archive")
        info = json.loads(raw)
        facts = info.get("key_facts") or {}
        diff = compare(built, facts)
        if diff:
            what = "; ".join(f"{k}: built {json.dumps(built.get(k))}, device "
                             f"{json.dumps(facts.get(k))}" for k in diff)
            raise ValueError(f"merge: the device's Triton cache key facts differ from "
                             f"{os.path.join(out, BUILD_INFO)} ({', '.join(diff)}): its entries "
                             f"would never be hit; refusing. {what}")
        dev = os.path.join(out, DEVICE_DIR)
        os.makedirs(dev, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="devcache-merge-", dir=out) as tmp:
            ents, ind = os.path.join(tmp, "entries"), os.path.join(tmp, "inductor")
            os.makedirs(ents)
            os.makedirs(ind)
            old_path = os.path.join(dev, ARCHIVE)
            if os.path.isfile(old_path):
                with tarfile.open(old_path) as o:
                    o.extractall(ents, filter="data")
            before = set(entries(ents))
            raw = _read_member(t, ARCHIVE)
            if raw is not None:
                import io
                with tarfile.open(fileobj=io.BytesIO(raw)) as n:
                    ms = [m for m in n.getmembers() if m.name.split("/")[0] not in before]
                    n.extractall(ents, members=ms, filter="data")
            got = entries(ents)
            added = len(set(got) - before)
            old_ind = os.path.join(dev, INDUCTOR_ARCHIVE)
            if os.path.isfile(old_ind):
                with tarfile.open(old_ind) as o:
                    o.extractall(ind, filter="data")
            raw = _read_member(t, INDUCTOR_ARCHIVE)
            if raw is not None:
                import io
                with tarfile.open(fileobj=io.BytesIO(raw)) as n:
                    n.extractall(ind, filter="data")
            ind_files = inductor_files(ind)
            if got:
                pack(ents)
                os.replace(os.path.join(ents, ARCHIVE), old_path)
            if ind_files:
                _tar_files(os.path.join(dev, INDUCTOR_ARCHIVE), ind, ind_files)
    try:
        with open(os.path.join(dev, DEVICE_INFO)) as f:
            merged = json.load(f)
    except (OSError, ValueError):
        merged = {}
    calls = [c for c in merged.get("calls", []) if c.get("run_id") != info.get("run_id")]
    calls.append({k: info.get(k) for k in ("run_id", "commit", "gpu", "torch", "entries",
                                           "inductor_files", "dropped_entries")})
    merged = {"key_facts": facts, "gpu": info.get("gpu"), "torch": info.get("torch"),
              "entries": len(got), "kernels": dict(sorted(collections.Counter(
                  got.values()).items())), "inductor_files": len(ind_files), "calls": calls}
    with open(os.path.join(dev, DEVICE_INFO) + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(os.path.join(dev, DEVICE_INFO) + ".tmp", os.path.join(dev, DEVICE_INFO))
    size = _folder_bytes(out)
    print(f"triton cache merge: {added} new device entries ({len(got)} in {dev}), "
          f"{len(ind_files)} Inductor cache files (FX graph / AOTAutograd; they hit only on a "
          f"{info.get('gpu')}), from run {info.get('run_id')}; {out} is now "
          f"{size / 2**20:.1f} MiB", flush=True)
    if size > CARRY_SHARE:
        print(f"triton cache merge: warning: {out} is over {CARRY_SHARE // 2**20} MiB, its share "
              f"of the call's 64 MiB carry (.prebuilt, .whl and the tree take ~20 MiB): remove "
              f"{dev} (the device compiles again) or rebuild", flush=True)
    return merged


CARRY_SHARE = 44 * 2**20


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


# The device's compiles outlive the session that merged them only in git: every session starts on
# a fresh machine (no .triton-cache/), so merge mirrors device/ into this tracked folder and
# gpu_prep.sh seeds .triton-cache/device/ from it (seed). Binary, a few MiB per GPU call.
COMMITTED_DEVICE = os.path.join(HERE, "device_cache")
COMMITTED_FILES = (ARCHIVE, INDUCTOR_ARCHIVE, DEVICE_INFO)
COMMITTED_WARN = 16 * 2**20


def keep_committed(out, dest=COMMITTED_DEVICE):
    """Mirror `out`/device/'s files (COMMITTED_FILES) into `dest`, the folder committed to git
    (files device/ lacks are removed from it). Returns dest's size in bytes."""
    dev = os.path.join(out, DEVICE_DIR)
    os.makedirs(dest, exist_ok=True)
    for name in COMMITTED_FILES:
        src, dst = os.path.join(dev, name), os.path.join(dest, name)
        if os.path.isfile(src):
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        elif os.path.exists(dst):
            os.remove(dst)
    size = _folder_bytes(dest)
    print(f"triton cache merge: committed copy {dest} is {size / 2**20:.1f} MiB: commit it (the "
          f"next session's machine starts without .triton-cache/; make gpu-prep seeds device/ "
          f"from it)", flush=True)
    if size > COMMITTED_WARN:
        print(f"triton cache merge: warning: {dest} is over {COMMITTED_WARN // 2**20} MiB: every "
              f"commit of it stays in git's history; consider starting it over (remove it and "
              f".triton-cache/device/, merge only the newest call)", flush=True)
    return size


def seed(out, src=COMMITTED_DEVICE):
    """Give `out` a device/ folder from the committed copy `src` when it has none (a fresh
    machine). Returns the files copied (0: `out`/device/ exists, or `src` holds no info file)."""
    dev = os.path.join(out, DEVICE_DIR)
    if os.path.isdir(dev):
        print(f"triton cache seed: {dev} exists, kept (merge keeps {src} in step with it)",
              flush=True)
        return 0
    if not os.path.isfile(os.path.join(src, DEVICE_INFO)):
        print(f"triton cache seed: no committed device cache in {src}: the device compiles what "
              f"the build lacks", flush=True)
        return 0
    os.makedirs(dev + ".tmp", exist_ok=True)
    names = [n for n in COMMITTED_FILES if os.path.isfile(os.path.join(src, n))]
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dev + ".tmp", name))
    os.replace(dev + ".tmp", dev)
    with open(os.path.join(dev, DEVICE_INFO)) as f:
        info = json.load(f)
    print(f"triton cache seed: {dev} from {src}: {info.get('entries')} Triton entries, "
          f"{info.get('inductor_files')} Inductor files, from {len(info.get('calls') or [])} "
          f"call(s) on {info.get('gpu')}", flush=True)
    return len(names)


def install_device(carried, cache_dir, inductor_dir):
    """Install `carried`/device/ (merge's folder): its Triton entries into `cache_dir` (group
    files rewritten as install does) and its Inductor files into `inductor_dir`. Returns a report;
    never raises (a missing or broken device cache only costs the compiles)."""
    dev = os.path.join(carried, DEVICE_DIR)
    rep = {"carried": os.path.isdir(dev)}
    if not rep["carried"]:
        return rep
    try:
        with open(os.path.join(dev, DEVICE_INFO)) as f:
            info = json.load(f)
        rep.update(gpu=info.get("gpu"), torch=info.get("torch"), key_facts=info.get("key_facts"),
                   runs=[c.get("run_id") for c in info.get("calls", [])])
    except (OSError, ValueError) as e:
        rep["info_error"] = f"{type(e).__name__}: {e}"
    try:
        rep["installed"] = install(dev, cache_dir) if os.path.isfile(
            os.path.join(dev, ARCHIVE)) else 0
    except Exception as e:  # a broken archive: compile as usual
        rep["installed"] = 0
        rep["error"] = f"entries: {type(e).__name__}: {e}"
    ind = os.path.join(dev, INDUCTOR_ARCHIVE)
    rep["inductor_dir"] = inductor_dir
    rep["inductor_files"] = 0
    if os.path.isfile(ind) and inductor_dir:
        try:
            os.makedirs(inductor_dir, exist_ok=True)
            with tarfile.open(ind) as t:
                ms = [m for m in t.getmembers() if m.isfile() or m.isdir()]
                t.extractall(inductor_dir, members=ms, filter="data")
            rep["inductor_files"] = sum(m.isfile() for m in ms)
        except Exception as e:
            rep["error"] = (rep.get("error", "") + f" inductor: {type(e).__name__}: {e}").strip()
    return rep


# ------------------------------------------------------------------------------------------------
# Build (the CPU side)
# ------------------------------------------------------------------------------------------------

class _FakeDriver:
    """What JITFunction.run and create_binder ask the active driver, for a GPU that is not here:
    its target, device 0 and a null stream. Nothing is launched."""

    def __init__(self, target):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget(*target)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def use_target(target=TARGET):
    from triton.runtime.driver import driver
    driver.set_active(_FakeDriver(target))


def _kernel_origin(fn):
    return fn.fn.__module__, fn.fn.__qualname__


class CompileCapture:
    """Patch JITFunction._do_compile to record each compile request the JIT makes (with the objects
    it would compile: ASTSource(fn, signature, constexprs, attrs), the parsed options, the env) and
    skip the compile. `requests`: {cache hash: request}."""

    def __init__(self):
        self.requests = collections.OrderedDict()
        self.failed = []

    def install(self):
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.runtime.cache import get_cache_key
        from triton.runtime.jit import JITFunction, get_full_name, serialize_specialization_data
        cap = self

        def _do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            backend = fn.device_caches[device][3]
            src = fn.ASTSource(fn, signature, constexprs, attrs)
            env_vars = get_cache_invalidating_env_vars()
            h = hashlib.sha256(get_cache_key(src, backend, options, env_vars).encode()).hexdigest()
            if h in cap.requests:
                return None
            module, qualname = _kernel_origin(fn)
            try:
                spec = serialize_specialization_data(get_full_name(fn.fn), signature, constexprs,
                                                     attrs, options, key)
            except (TypeError, ValueError) as e:  # a constexpr JSON cannot hold
                cap.failed.append({"kernel": qualname, "error": repr(e)})
                return None
            cap.requests[h] = {"hash": h, "module": module, "qualname": qualname,
                               "name": fn.fn.__name__, "spec": spec}
            return None

        JITFunction._do_compile = _do_compile


def capture_requests(tier, pytest_args, autotune=False, target=TARGET, bench=True):
    """Run the tier's tests as tests/_count_compiles.py does, every launch through Triton's own
    JITFunction.run on a fake `target` driver up to _do_compile, recorded there (this process is
    left patched: run it in a subprocess). Returns (requests, counter result)."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    _import_tree()
    import _count_compiles as cc
    from triton.runtime.jit import JITFunction
    real_run = JITFunction.run
    cap = CompileCapture()

    class Recorder(cc._Recorder):
        def install(self):
            super().install()           # the counter's key recorder and pinned autotuner
            record = JITFunction.run

            def run(fn, *args, grid, warmup, **kwargs):
                record(fn, *args, grid=grid, warmup=warmup, **kwargs)
                return real_run(fn, *args, grid=grid, warmup=True, **kwargs)
            JITFunction.run = run
            use_target(target)
            cap.install()

    rec = Recorder()
    res = cc.count(tier, autotune, pytest_args, recorder=rec,
                   arch="sm90" if target[1] >= 90 else "sm80")
    if bench:
        n0 = len(cap.requests)
        with cc._cuda_to_cpu_mode():
            _bench_attention_launches(rec, cap.failed)
        res["bench_attention_compiles"] = len(cap.requests) - n0
        n1 = len(cap.requests)
        with cc._cuda_to_cpu_mode():
            _bench_stage_launches(rec, cap.failed)
        res["bench_stage_compiles"] = len(cap.requests) - n1
    return list(cap.requests.values()), res, cap.failed


def _bench_attention_launches(rec, failed):
    """The attention_table stage's pyencoder-triton cases as bench_attention._measure runs them
    (its make_provider under its _rope_table_env; forward without and with gradients, then the
    backward): every N and mask of the stage (gpu_session.ATTENTION_TABLE_NS, TABLE_MASKS), the
    three RoPE-mode providers with RoPE and pyencoder-triton without, the kernel-flag A/B
    provider (gpu_session.PIPE_PROVIDER) at PIPE_N with and without RoPE, launches only (inside
    capture_requests' patches)."""
    import torch

    import pyencoder
    from benchmarks import bench_attention as ba
    from benchmarks import gpu_session as gs
    B, H, D = ba.SHAPES["wav2vec2-base"]
    ns = [int(n) for n in gs.ATTENTION_TABLE_NS]
    cases = [(prov, True) for prov in gs.ROPE_PROVIDERS] + [("pyencoder-triton", False)]
    runs = [(n, prov, rope) for n in ns for prov, rope in cases]
    runs += [(int(gs.PIPE_N), gs.PIPE_PROVIDER, rope) for rope in (True, False)]
    for n, prov, rope in runs:
        for m in map(ba.parse_mask, gs.TABLE_MASKS):
            rec.test = f"bench_attention {prov} N={n} {ba.mask_name(m)} rope={rope}"
            try:
                leaves = [torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16,
                                      requires_grad=True) for _ in range(3)]
                with ba._rope_table_env(prov):
                    fwd = ba.make_provider(prov, *leaves, m,
                                           pyencoder.Rope(D) if rope else None)
                    with torch.no_grad():
                        fwd()
                    out = fwd()
                    torch.autograd.grad(out, leaves, torch.randn_like(out))
            except Exception as e:  # reported in build_info.json's failed list
                failed.append({"kernel": rec.test, "error": f"{type(e).__name__}: {e}"[:500]})
    # the tuning run (gpu_session's attention_table "tune" command): every tile of the pruned
    # autotune lists (PYENCODER_TRITON_AUTOTUNE=full), RoPE off, N = TUNE_N, the stage's masks
    old = os.environ.get("PYENCODER_TRITON_AUTOTUNE")
    os.environ["PYENCODER_TRITON_AUTOTUNE"] = "full"
    try:
        for m in map(ba.parse_mask, gs.TABLE_MASKS):
            rec.test = f"bench_attention tune N={gs.TUNE_N} {ba.mask_name(m)}"
            try:
                leaves = [torch.randn(B, H, int(gs.TUNE_N), D, device="cuda",
                                      dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
                fwd = ba.make_provider("pyencoder-triton", *leaves, m, None)
                out = fwd()
                torch.autograd.grad(out, leaves, torch.randn_like(out))
            except Exception as e:
                failed.append({"kernel": rec.test, "error": f"{type(e).__name__}: {e}"[:500]})
    finally:
        if old is None:
            os.environ.pop("PYENCODER_TRITON_AUTOTUNE", None)
        else:
            os.environ["PYENCODER_TRITON_AUTOTUNE"] = old


def _bench_stage_launches(rec, failed):
    """The Triton launches of the session's other benchmarks at the shapes their GPU stage runs,
    which the tests' shapes do not cover (the c446fb01b9e0 call compiled 16 of our kernels in
    the conv stage, 14 in convnext_hf, 3 in streaming): bench_conv --quick's pyencoder-triton
    provider (every suite, forward and forward+backward) and the conv stage's grouped A/B
    (gpu_session.CONV_GRP_AB_ARGS: its tile providers), bench_convnext --quick's fused provider
    (offline and the streaming steps) and bench_streaming's ``step_fixed`` per mask at batch 1
    and at a batch of 16 (the streams search's batches are multiples of 256: the same
    specialisation) and its A/B variants of the chunked batch-1 step (``STEP_VARIANTS``: the
    dense strided convs on the triton backend; ``MODEL_VARIANTS``: the converted wav2vec2-base
    encoder's whole step), through the benchmarks' own case code with their timers replaced by one
    call (launches only, inside capture_requests' patches)."""
    import types

    import torch

    from benchmarks import bench_conv as bconv
    from benchmarks import bench_convnext as bcx
    from benchmarks import bench_streaming as bs

    def once(fn, *a, **k):
        fn()
        return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}
    saved = [(m, n, getattr(m, n)) for m, n in (
        (bconv, "bench"), (bconv, "host_graph_fields"), (bconv, "copy_bandwidth_gbs"),
        (bcx, "bench"), (bcx, "copy_bandwidth_gbs"), (bcx, "_composed"), (bcx, "_composed_step"))]
    bconv.bench, bcx.bench = once, once
    bconv.host_graph_fields = lambda *a, **k: {}
    bconv.copy_bandwidth_gbs = bcx.copy_bandwidth_gbs = lambda *a, **k: 1.0
    bcx._composed = bcx._composed_step = lambda *a: None    # cuDNN / the cuda conv on the device

    def attempt(label, fn):
        rec.test = label
        try:
            fn()
        except Exception as e:  # reported in build_info.json's failed list
            failed.append({"kernel": label, "error": f"{type(e).__name__}: {e}"[:500]})
    try:
        from benchmarks import gpu_session as gs
        for label, argv in (("bench_conv --quick", ["--quick"]),
                            ("bench_conv grouped A/B", gs.CONV_GRP_AB_ARGS)):
            args = bconv.parser().parse_args(argv)
            args.providers = [p for p in (args.providers or bconv.PROVIDERS)
                              if p == "pyencoder-triton"]
            args.no_write, args.max_seconds = True, None
            attempt(f"{label} (pyencoder-triton)", lambda args=args: bconv.run(args))
        attempt("bench_convnext --quick (fused)", lambda: bcx.run(types.SimpleNamespace(
            quick=True, dtypes=["bfloat16", "float32"], tiles=gs.CONVNEXT_TILES,
            no_write=True)))
    finally:
        for m, n, v in saved:
            setattr(m, n, v)
    import pyencoder
    for name, cfg in bs.GPU_MASKS.items():
        for B in (1, 16):
            def step(cfg=cfg, B=B):
                torch.manual_seed(0)
                model = bs.build(layers=2, dim=768, heads=12, ffn=3072, conv_dim=512,
                                 **{k: v for k, v in cfg.items() if k != "step_frames"})
                model = model.to(torch.bfloat16)
                # the stack's convs are dense and strided: cuDNN through the cuda backend on the
                # device (no Triton), the triton backend here, where pyencoder._C is not loaded
                with pyencoder.use_backend(conv="reference"):
                    run = bs.StepRunner(model, B, "cuda", torch.bfloat16, cfg["step_frames"],
                                        graph=False)
                    run()
            attempt(f"bench_streaming step_fixed {name} batch {B}", step)

    def variant(vname):
        # the A/B variants of the chunked 80 ms step (bench_streaming --variants): the backends
        # they force run here as on the device (conv-triton: the dense strided convs' Triton
        # launches at step sizes)
        cfg = bs.GPU_MASKS["chunked"]
        torch.manual_seed(0)
        model = bs.build(layers=2, dim=768, heads=12, ffn=3072, conv_dim=512,
                         **{k: v for k, v in cfg.items() if k != "step_frames"})
        model = model.to(torch.bfloat16)
        with pyencoder.use_backend(**bs.STEP_VARIANTS[vname]):
            bs.StepRunner(model, 1, "cuda", torch.bfloat16, cfg["step_frames"], graph=False)()

    def model_variant(vname):
        # the model variants (bench_streaming.MODEL_VARIANTS: the converted wav2vec2-base
        # encoder): backends as the capture selects them (its grouped positional conv is a
        # Triton launch on the device; its dense strided convs are cuDNN's there, Triton here:
        # the conv-triton variant's specialisations, no new compile)
        cfg = bs.GPU_MASKS["chunked"]
        torch.manual_seed(0)
        model = bs.MODEL_VARIANTS[vname](layers=2, dim=768, heads=12, ffn=3072, conv_dim=512,
                                         **{k: v for k, v in cfg.items()
                                            if k != "step_frames"})
        model = model.to(torch.bfloat16)
        bs.StepRunner(model, 1, "cuda", torch.bfloat16, cfg["step_frames"], graph=False)()
    for vname in sorted(bs.STEP_VARIANTS):
        attempt(f"bench_streaming step_fixed chunked batch 1 variant {vname}",
                lambda vname=vname: variant(vname))
    for vname in sorted(bs.MODEL_VARIANTS):
        attempt(f"bench_streaming step_fixed chunked batch 1 variant {vname}",
                lambda vname=vname: model_variant(vname))
    attempt("bench_hf --quick (pyencoder)", _bench_hf_launches)

    def running_norm():
        # bench_running_norm --quick's kernel rows (the streaming stage's last command)
        from benchmarks import bench_running_norm as brn
        for B, T, n0 in ((8, 8000, 0), (1, 256, 6400)):
            x = torch.randn(B, brn.C, T, dtype=torch.bfloat16, device="cuda")
            w = torch.randn(brn.C, dtype=torch.bfloat16, device="cuda")
            tot = torch.zeros(B, brn.C, dtype=torch.float64, device="cuda")
            with torch.no_grad():
                brn._providers()["kernel"](x, w, w, 1e-5, torch.full((B,), n0, device="cuda"),
                                           tot, tot)
            from pyencoder.models.frontend import ChannelLayerNorm
            brn._channel_providers(ChannelLayerNorm(brn.C).to("cuda", torch.bfloat16))[
                "kernel"](x)
    attempt("bench_running_norm --quick (kernel)", running_norm)


def _bench_hf_launches():
    """bench_hf --quick's pyencoder rows as the convnext_hf stage runs them (bf16, batch 1,
    10 s offline, 6 s of stream warm-up then 20 and 100 ms chunks), on 2 of the 12 layers (layer 0
    with its lookahead and a later one: the other layers launch what layer 1 does), timers and
    CUDA synchronisation stubbed. Needs transformers (gpu_prep.sh installs it in the build
    venv); its first call compiled the patched model's kernels on the device."""
    import types

    import torch

    from benchmarks import bench_hf as bhf
    saved = (bhf.bench, bhf._peak, torch.cuda.synchronize)
    bhf.bench = lambda fn, **k: (fn(), {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})[1]
    bhf._peak = lambda fn, device: None
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        args = types.SimpleNamespace(layers=2, seconds=10.0, batch=1, steps=2, warm_seconds=6.0,
                                     providers=["pyencoder"], warmup_ms=1, rep_ms=1)
        dev = torch.device("cuda")
        bhf.offline(args, dev, torch.bfloat16)
        bhf.streaming(args, dev, torch.bfloat16)
    finally:
        bhf.bench, bhf._peak, torch.cuda.synchronize = saved


class _Miss(Exception):
    pass


def _spec(fn, args, kwargs):
    """A missed launch's specialisation as the capture keys it (the arguments' dtypes and
    alignment / divisibility marks, the constexprs), to compare with the captured keys."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, BaseBackend)
        params = {k: v for k, v in kwargs.items() if k in fn.arg_names}
        opts = sorted((k, v) for k, v in kwargs.items() if k not in fn.arg_names)
        return json.dumps([binder(*args, **params)[1], opts], default=str)[:1500]
    except Exception as e:  # noqa: BLE001 - a report, never the replay's failure
        return f"(specialisation not computed: {type(e).__name__})"


def replay(cache_dir, tier, pytest_args, autotune=False, target=TARGET, bench=True):
    """Run the capture's launches again with the JIT compiling for real on the fake `target`
    driver (warmup: nothing is launched) against the installed cache `cache_dir`; a miss (the
    backend compiler about to run) is recorded by kernel name and raised instead of compiled (its
    test stops there). This process is left patched: run it in a subprocess. Returns
    {hits: distinct kernels loaded from the cache, misses: {name: count}}."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    _import_tree()
    import _count_compiles as cc
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction
    real_run = JITFunction.run
    loaded, misses, where = set(), collections.Counter(), []

    def add_stages(backend, stages, options, language=None):
        raise _Miss("not in the cache")

    class Recorder(cc._Recorder):
        def install(self):
            super().install()

            def run(fn, *args, grid, warmup, **kwargs):
                try:
                    k = real_run(fn, *args, grid=grid, warmup=True, **kwargs)
                except _Miss:
                    misses[fn.fn.__name__] += 1
                    where.append(f"{fn.fn.__name__} in {rec.test}: {_spec(fn, args, kwargs)}")
                    raise
                loaded.add(k.hash)
                return k
            JITFunction.run = run
            CUDABackend.add_stages = add_stages
            use_target(target)

    rec = Recorder()
    cc.count(tier, autotune, pytest_args, recorder=rec, arch="sm90" if target[1] >= 90 else "sm80")
    if bench:
        with cc._cuda_to_cpu_mode():
            _bench_attention_launches(rec, [])
            _bench_stage_launches(rec, [])
    return {"hits": len(loaded), "misses": dict(sorted(misses.items())), "missed_in": where}


def verify(cache, tier, pytest_args, autotune=False, target=TARGET, bench=True):
    """Install the packed cache `cache` into a temporary folder (as the device does) and replay
    the launches against it in a subprocess; prints and returns {hits, misses}."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="triton-cache-verify-") as tmp:
        dst = os.path.join(tmp, "cache")
        n = install(cache, dst)
        out = os.path.join(tmp, "replay.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "benchmarks.triton_cache", "_replay", "--cache", dst,
                "--result", out, "--tier", tier, "--autotune", str(int(autotune)), "--target",
                *map(str, target), *([] if bench else ["--no-bench"]), *pytest_args]
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=ROOT, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"triton cache: the replay failed (rc {p.returncode})")
        res = json.load(open(out))
    res["installed"] = n
    res["seconds"] = round(time.monotonic() - t0, 1)
    print(f"triton cache verify: {n} entries installed; the launches loaded {res['hits']} "
          f"kernels from it and missed {sum(res['misses'].values())} "
          f"({json.dumps(res['misses'])}) in {res['seconds']} s", flush=True)
    for w in res["missed_in"]:
        print("  missed:", w)
    return res


def _import_tree():
    """Import pyencoder from this tree, with pyencoder.triton_kernels mapped to triton_kernels/
    as setup.py's package_dir does (a build venv need not have the package installed)."""
    import importlib
    import importlib.util
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pyencoder
    name = "pyencoder.triton_kernels"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        kdir = os.path.join(ROOT, "triton_kernels")
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(kdir, "__init__.py"), submodule_search_locations=[kdir])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        pyencoder.triton_kernels = mod
    importlib.import_module(name)


def _worker_init(cache_dir, target, nice):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"   # not a cache-invalidating variable
    os.environ.pop("TRITON_INTERPRET", None)
    if nice:
        os.nice(nice)
    _import_tree()
    use_target(target)


def compile_request(req):
    """Compile one recorded request through JITFunction.preload (the JIT's path to
    triton.compile); returns {hash, seconds, ok, error}."""
    import importlib

    from triton.runtime.jit import JITFunction
    t0 = time.monotonic()
    out = {"hash": req["hash"], "name": req["name"]}
    try:
        obj = importlib.import_module(req["module"])
        for part in req["qualname"].split("."):
            obj = getattr(obj, part)
        while not isinstance(obj, JITFunction):
            obj = obj.fn                              # Autotuner / Heuristics wrappers
        kernel = obj.preload(req["spec"])
        out["ok"] = kernel.hash == req["hash"]
        if not out["ok"]:
            out["error"] = f"compiled under {kernel.hash}, the launch asked for {req['hash']}"
    except Exception as e:  # reported per request; the others still compile
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _cost(req):
    # longest first: the attention kernels take 3.5-11 s each, the others about 1 s
    return (0 if "attention" in req["name"] else 1, req["name"])


def compile_all(requests, cache_dir, jobs, target=TARGET, nice=0):
    import concurrent.futures as cf
    import multiprocessing as mp
    reqs = sorted(requests, key=_cost)
    if not reqs:
        return []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                initializer=_worker_init,
                                initargs=(cache_dir, tuple(target), nice)) as pool:
        return list(pool.map(compile_request, reqs, chunksize=1))


def reuse_entries(previous, requests, stage, target=TARGET):
    """Copy into `stage` the entries of the cache folder `previous` (a packed .triton-cache) that
    a request asks for by hash, when `previous` was built with this Triton's key facts: an entry
    is keyed by everything that decides its binary (source, signature, constexprs, options,
    Triton, ptxas, arch), so an unchanged kernel's entry is the compile it would redo. Returns the
    request hashes reused (none when `previous` is None, absent, or of other key facts)."""
    if not previous:
        return set()
    archive = os.path.join(previous, ARCHIVE)
    try:
        with open(os.path.join(previous, BUILD_INFO)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return set()
    facts = key_facts(target)
    if not os.path.isfile(archive) or any(old.get(k) != facts.get(k) for k in KEY_FIELDS):
        return set()
    from triton.runtime.cache import _base32
    want = {_base32(r["hash"]): r["hash"] for r in requests}
    got = set()
    with tarfile.open(archive, "r:gz") as t:
        members = [m for m in t.getmembers() if m.name.split("/")[0] in want]
        t.extractall(stage, members=members, filter="data")
    for key in {m.name.split("/")[0] for m in members}:
        if any(f.startswith("__grp__") for f in os.listdir(os.path.join(stage, key))):
            got.add(want[key])
        else:
            shutil.rmtree(os.path.join(stage, key))
    return got


def keep_device(out, stage, info):
    """Move `out`/device/ (the device's compiles, merge's folder) into the new build `stage`, so a
    rebuild keeps them; print how many entries it holds and which of them cannot hit any more
    (all of them when the new key facts differ; an edited kernel's entries are stale too, never
    hit and harmless, but not told apart here). Returns the entry count kept."""
    src = os.path.join(out, DEVICE_DIR)
    if not os.path.isdir(src):
        return 0
    shutil.move(src, os.path.join(stage, DEVICE_DIR))
    try:
        with open(os.path.join(stage, DEVICE_DIR, DEVICE_INFO)) as f:
            dev = json.load(f)
    except (OSError, ValueError):
        dev = {}
    n = int(dev.get("entries") or 0)
    ours = sum(v for k, v in (dev.get("kernels") or {}).items() if not k.startswith("triton_"))
    diff = compare(dev.get("key_facts"), info)
    stale = n if diff else 0
    print(f"triton cache: {DEVICE_DIR}/ kept: {n} device entries ({ours} of this project's "
          f"kernels: those of an edited kernel are stale, never hit, harmless; {n - ours} "
          f"Inductor's), {dev.get('inductor_files', 0)} Inductor files; {stale} stale by key "
          f"facts{' (differs: ' + ', '.join(diff) + ')' if diff else ''}", flush=True)
    return n


def build(out, tier, pytest_args, jobs, autotune=False, target=TARGET, nice=0, bench=True,
          reuse=True):
    """Capture (a subprocess), compile (`jobs` processes) into a staging folder, prune, and
    replace `out` with it. Returns build_info. ``reuse``: entries of the cache already at `out`
    that a request names (same key facts) are copied instead of compiled (reuse_entries)."""
    t0 = time.monotonic()
    out = os.path.abspath(out)
    stage = out + ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    reqfile = os.path.join(stage, "requests.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(stage, "capture-unused")
    argv = [sys.executable, "-m", "benchmarks.triton_cache", "_capture", "--requests", reqfile,
            "--tier", tier, "--autotune", str(int(autotune)), "--target", *map(str, target),
            *([] if bench else ["--no-bench"]), *pytest_args]
    print(f"triton cache: capturing the launches of -m {tier} {' '.join(pytest_args)}",
          flush=True)
    p = subprocess.run(argv, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"triton cache: the capture failed (rc {p.returncode})")
    cap = json.load(open(reqfile))
    t_cap = time.monotonic() - t0
    print(f"triton cache: {len(cap['requests'])} compiles captured in {t_cap:.0f} s "
          f"(the counter's estimate: {cap['counter']['compiles']}); compiling with {jobs} jobs",
          flush=True)
    os.remove(reqfile)
    shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    t1 = time.monotonic()
    reused = reuse_entries(out if reuse else None, cap["requests"], stage, target)
    todo = [r for r in cap["requests"] if r["hash"] not in reused]
    print(f"triton cache: {len(reused)} entries reused from the previous {out} "
          f"(same key facts and hash), {len(todo)} to compile", flush=True)
    results = compile_all(todo, stage, jobs, target, nice)
    t_comp = time.monotonic() - t1
    bad = [r for r in results if not r["ok"]]
    good = {r["hash"] for r in results if r["ok"]} | reused
    from triton.runtime.cache import _base32
    for r in bad:   # a compile that does not reproduce its launch's key is not kept
        shutil.rmtree(os.path.join(stage, _base32(r["hash"])), ignore_errors=True)
    size = prune(stage)
    ents = entries(stage)
    packed = pack(stage)
    info = dict(key_facts(target))
    info.update(
        tier=tier, autotune=autotune, pytest_args=list(pytest_args), jobs=jobs, bench=bench,
        entries=len(ents), kernels=dict(sorted(collections.Counter(ents.values()).items())),
        bytes=size, archive_bytes=packed, captured=len(cap["requests"]), compiled=len(good),
        reused=len(reused),
        failed=[{k: r[k] for k in ("name", "error")} for r in bad] + cap["not_captured"],
        capture_s=round(t_cap, 1), compile_s=round(t_comp, 1),
        compile_worker_s=round(sum(r["seconds"] for r in results), 1),
        counter=cap["counter"], built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with open(os.path.join(stage, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1)
    info["device_entries_kept"] = keep_device(out, stage, info)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)
    print(f"triton cache: {len(ents)} entries, {size / 2**20:.1f} MiB ({packed / 2**20:.1f} MiB "
          f"as {ARCHIVE}, carried) in {out}; compiled in {t_comp:.0f} s wall "
          f"({info['compile_worker_s']:.0f} s summed over kernels, {jobs} jobs), "
          f"{time.monotonic() - t0:.0f} s in all; {len(info['failed'])} failed", flush=True)
    for r in info["failed"]:
        print("  failed:", json.dumps(r)[:500])
    print("triton cache key facts:", json.dumps({k: info[k] for k in KEY_FIELDS + ("python",)}))
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_cache",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="capture, compile and prune a cache folder")
    b.add_argument("--out", default=os.path.join(ROOT, ".triton-cache"))
    b.add_argument("--jobs", type=int, default=int(os.environ.get("GPU_PREP_JOBS", "2")))
    b.add_argument("--nice", type=int, default=0, help="os.nice() of the compile processes")
    b.add_argument("--no-reuse", action="store_true",
                   help="compile every request (default: reuse the matching entries of --out)")
    v = sub.add_parser("verify", help="replay the launches against an installed copy of a cache")
    v.add_argument("--cache", default=os.path.join(ROOT, ".triton-cache"))
    r = sub.add_parser("_replay")
    r.add_argument("--cache", required=True)
    r.add_argument("--result", required=True)
    for q in (b, sub.add_parser("_capture"), v, r):
        q.add_argument("--tier", default="gpu_quick")
        q.add_argument("--autotune", type=int, choices=(0, 1), default=0)
        q.add_argument("--no-bench", action="store_true",
                       help="only the tier's tests, not the attention_table stage's cases")
        q.add_argument("--target", nargs=3, default=list(TARGET), metavar=("BACKEND", "ARCH",
                                                                           "WARP"))
    sub.choices["_capture"].add_argument("--requests", required=True)
    m = sub.add_parser("merge", help="keep a device call's device-cache.tgz in --out/device/")
    m.add_argument("archive", help="the device-cache.tgz a GPU call brought back")
    m.add_argument("--out", default=os.path.join(ROOT, ".triton-cache"))
    m.add_argument("--keep", default=COMMITTED_DEVICE,
                   help="mirror the merged device/ into this folder, the one committed to git "
                        "(default benchmarks/device_cache)")
    m.add_argument("--no-keep", action="store_true", help="do not mirror it")
    sd = sub.add_parser("seed", help="give --out a device/ from the committed copy when it has "
                                     "none (a fresh machine)")
    sd.add_argument("--out", default=os.path.join(ROOT, ".triton-cache"))
    sd.add_argument("--from", dest="src", default=COMMITTED_DEVICE)
    f = sub.add_parser("facts", help="print this Triton's cache key facts")
    f.add_argument("--target", nargs=3, default=list(TARGET))
    args, rest = p.parse_known_args(argv)
    if args.cmd == "merge":
        if not os.path.isfile(args.archive):
            p.error(f"merge: archive {args.archive!r} is not a file (expected the "
                    f"{DEVICE_ARCHIVE} a GPU call brought back)")
        try:
            merge(args.archive, args.out)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 1
        if not args.no_keep:
            keep_committed(args.out, args.keep)
        return 0
    if args.cmd == "seed":
        seed(args.out, args.src)
        return 0
    target = (args.target[0], int(args.target[1]), int(args.target[2]))
    if args.cmd == "facts":
        print(json.dumps(key_facts(target), indent=1))
        return 0
    if args.cmd == "_capture":
        reqs, res, failed = capture_requests(args.tier, rest or _session_test_files(),
                                             bool(args.autotune), target, not args.no_bench)
        with open(args.requests, "w") as fh:
            json.dump({"requests": reqs, "counter": res, "not_captured": failed}, fh)
        return 0
    files = rest or _session_test_files()
    if args.cmd == "_replay":
        res = replay(args.cache, args.tier, files, bool(args.autotune), target, not args.no_bench)
        with open(args.result, "w") as fh:
            json.dump(res, fh)
        return 0
    if args.cmd == "verify":
        res = verify(args.cache, args.tier, files, bool(args.autotune), target, not args.no_bench)
        return 1 if res["misses"] else 0
    if args.jobs < 1:
        p.error(f"--jobs (GPU_PREP_JOBS) must be >= 1; got {args.jobs}")
    info = build(args.out, args.tier, rest or _session_test_files(), args.jobs,
                 bool(args.autotune), target, args.nice, not args.no_bench,
                 reuse=not args.no_reuse)
    return 1 if info["entries"] == 0 and info["captured"] else 0


if __name__ == "__main__":
    sys.exit(main())
