"""The Triton attention's tile choice on a GPU, checked on the CPU: the default table, the
PYENCODER_TRITON_AUTOTUNE modes (how many tiles a key compiles) and the launcher's routing.
No kernel runs here: the pruning functions get stand-in arguments and _launch fake kernels."""
import itertools

import pytest
import torch

A = pytest.importorskip("pyencoder.ops._attention_triton")
triton = pytest.importorskip("triton")


def _cfgs(name):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in A._TUNED[name]]


def _keys():
    for dt, D, rot, table, width, arch in itertools.product(
            (torch.float16, torch.bfloat16, torch.float32), (32, 64, 80, 128, 256),
            ("none", "half", "full"), (False, True), (7, 54, 254, None), ("sm80", "sm90")):
        half = {"none": 0, "half": D // 4, "full": D // 2}[rot]
        if table and half == 0:
            continue
        consts = A._consts(torch.empty(1, dtype=dt), D, half, D - 2 * half, 0, None, False,
                           table)
        win = A._window_key(1, 4096 if width is None else width - 4, 3, 12000)
        yield arch, {"Q": torch.empty(1, dtype=dt), "WIN_KEY": win}, consts


@pytest.fixture
def arch(monkeypatch):
    def use(a):
        monkeypatch.setattr(A, "_arch", lambda device: a)
    return use


def test_table_entries_are_tuned_tiles():
    # the compile matrix (tests/test_triton_compile.py) covers the tuned lists
    for rows in A._DEFAULT_TILES.values():
        for row in rows.values():
            for name, tiles in row.items():
                assert set(tiles) <= set(A._TUNED[name]), (name, tiles)


@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv"])
def test_modes_compile_counts(name, arch):
    n_keys = 0
    for a, named, consts in _keys():
        arch(a)
        full = A._pruner(name, "full")(_cfgs(name), named, **consts)
        auto = A._pruner(name, "auto")(_cfgs(name), named, **consts)
        pinned = A._pruner(name, "0")(_cfgs(name), named, **consts)
        assert 1 <= len(auto) <= 2 and len(pinned) == 1
        assert set(map(A._tile, auto)) <= set(map(A._tile, full))
        assert A._tile(pinned[0]) == A._tile(auto[0])
        if len(full) >= 2:
            assert len(auto) == 2
        n_keys += 1
    assert n_keys > 100


def test_default_choices_follow_the_table(arch):
    arch("sm90")
    q = torch.empty(1, dtype=torch.bfloat16)
    consts = A._consts(q, 64, 32, 0, 250, None, False, False)
    named = {"Q": q, "WIN_KEY": A._window_key(1, 250, 3, 3000)}
    got = [A._tile(c) for c in A._pruner("fwd", "auto")(_cfgs("fwd"), named, **consts)]
    assert got == A._T16_D64["fwd"][:2]
    # fp32 at head_dim 64 only gets the tiles that fit sm_80's shared memory
    q32 = torch.empty(1, dtype=torch.float32)
    named32 = dict(named, Q=q32)
    got = [A._tile(c) for c in A._pruner("dq", "full")(_cfgs("dq"), named32, **consts)]
    assert set(got) <= A._WIDE_TILES["dq"]


def test_rope_table_tiles_dropped_on_sm80_only(arch):
    q = torch.empty(1, dtype=torch.bfloat16)
    consts = A._consts(q, 128, 64, 0, 250, None, False, True)   # full rotary: BLOCK_R 64
    named = {"Q": q, "WIN_KEY": 4096}
    tiles = {}
    for a in ("sm80", "sm90"):
        arch(a)
        tiles[a] = {A._tile(c) for c in A._pruner("fwd", "full")(_cfgs("fwd"), named, **consts)}
    assert not tiles["sm80"] & A._TABLE_DROP[(False, "fwd")]
    assert A._TABLE_DROP[(False, "fwd")] <= tiles["sm90"]


def test_window_key_buckets():
    assert A._window_key(1, 250, 3, 12000) == 256
    assert A._window_key(1, 250, 3, 100) == 128          # capped by the key count
    assert A._window_key(1, -1, 0, 12000) == 4096        # unbounded left
    assert A._window_key(1, -1, 0, 3) == 16              # floor: 16-divisible
    assert A._window_key(4, 128 * 4, 3, 1 << 20) == 1024
    for n in (1, 17, 1000, 5000):
        k = A._window_key(1, 50, 3, n)
        assert k & (k - 1) == 0 and 16 <= k <= 4096


@pytest.mark.parametrize("raw,mode", [(None, "auto"), ("", "auto"), ("auto", "auto"),
                                      ("full", "full"), ("1", "full"), ("0", "0"),
                                      (" FULL ", "full"), ("on", "full"), ("off", "0")])
def test_autotune_mode_values(monkeypatch, raw, mode):
    if raw is None:
        monkeypatch.delenv("PYENCODER_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("PYENCODER_TRITON_AUTOTUNE", raw)
    assert A._autotune_mode() == mode
    assert A._autotune_enabled() == (mode != "0")


@pytest.mark.parametrize("value", ["2", "ture", "-1", "fast"])
def test_autotune_mode_rejects_bad_value(monkeypatch, value):
    monkeypatch.setenv("PYENCODER_TRITON_AUTOTUNE", value)
    with pytest.raises(ValueError, match=f"PYENCODER_TRITON_AUTOTUNE must be one of .*; "
                                         f"got '{value}'"):
        A._autotune_mode()


class _Fake:
    def __init__(self, log, label, fail=()):
        self.log, self.label, self.fail = log, label, fail

    def __getitem__(self, grid):
        def call(*args, **kw):
            tile = (kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("num_warps"),
                    kw.get("num_stages"))
            if tile in self.fail:
                raise type("OutOfResources", (Exception,), {})("smem")
            self.log.append((self.label, tile))
        return call


@pytest.mark.parametrize("mode", ["auto", "full", "0"])
@pytest.mark.parametrize("pinned", [False, True])
def test_launch_routing(monkeypatch, arch, mode, pinned):
    arch("sm90")
    monkeypatch.setenv("PYENCODER_TRITON_AUTOTUNE", mode)
    log = []
    first = A._T16_D64["dq"][0]
    fixed = _Fake(log, "fixed", fail=(first,) if mode == "0" else ())
    tuners = {"auto": _Fake(log, "auto"), "full": _Fake(log, "full")}
    monkeypatch.setattr(A, "_kernels", {"dq": (fixed, _cfgs("dq"), tuners)})
    q = torch.empty(1, dtype=torch.bfloat16)
    consts = A._consts(q, 64, 32, 0, 250, None, False, False)
    A._launch("dq", A.BlockGrid(1, "BLOCK_M", 1), (q, 256), consts, pinned=pinned)
    if pinned or mode == "0":
        # the table's first choice, untimed; on OutOfResources the fallback tile
        want = [("fixed", A._FALLBACK)] if mode == "0" else [("fixed", first)]
        assert log == want
    else:
        assert [x[0] for x in log] == [mode]


@pytest.mark.parametrize("a", ["sm80", "sm90"])
def test_bias_keys_use_the_bias_row(arch, a):
    """A gated-bias key (HAS_BIAS) takes the bias row (the tiles that do not spill), 16-bit
    head_dim <= 64 only; the pinned tiles are memoised per HAS_BIAS too."""
    arch(a)
    q = torch.empty(1, dtype=torch.bfloat16)
    base = A._consts(q, 64, 0, 64, 250, None, False, False)
    named = {"Q": q, "WIN_KEY": A._window_key(4, 62 * 4, 3, 1500)}
    for name in ("fwd", "dq", "dkdv"):
        plain = A._pruner(name, "0")(_cfgs(name), named, **dict(base, HAS_BIAS=False))
        biased = A._pruner(name, "0")(_cfgs(name), named, **dict(base, HAS_BIAS=True))
        assert A._tile(biased[0]) == A._T_BIAS[a][name][0]
        assert A._tile(plain[0]) == A._DEFAULT_TILES[a][("16", "d64")][name][0]
        p1 = A._pinned_tiles(name, _cfgs(name), q, named["WIN_KEY"], dict(base, HAS_BIAS=False))
        p2 = A._pinned_tiles(name, _cfgs(name), q, named["WIN_KEY"], dict(base, HAS_BIAS=True))
        assert p1[0] == A._tile(plain[0]) and p2[0] == A._tile(biased[0])
    # float32 keeps the wide tiles (shared memory), bias or not
    q32 = torch.empty(1, dtype=torch.float32)
    c32 = dict(A._consts(q32, 64, 0, 64, 250, None, False, False), HAS_BIAS=True)
    got = A._pruner("fwd", "full")(_cfgs("fwd"), dict(named, Q=q32), **c32)
    assert {A._tile(c) for c in got} <= A._WIDE_TILES["fwd"]


def test_sm90_forward_default_is_the_8_warp_tile(arch):
    # 128x64 at 4 warps spills registers on sm_90 (benchmarks/sass_stats.py); 8 warps do not
    arch("sm90")
    q = torch.empty(1, dtype=torch.bfloat16)
    consts = A._consts(q, 64, 0, 64, 50, None, False, False)
    named = {"Q": q, "WIN_KEY": A._window_key(1, 50, 3, 1500)}
    assert A._tile(A._pruner("fwd", "0")(_cfgs("fwd"), named, **consts)[0]) == (128, 64, 8, 3)
