"""benchmarks/bench_linear_skinny: the cold set spans the last-level cache, the cycled products
visit every matrix in turn and compute the same function as F.linear on it, and a tiny run prints
both sets."""
import torch
import torch.nn.functional as F

from benchmarks import bench_linear_skinny as B


def test_cold_count_spans_cache():
    llc = 32 << 20
    n = B.cold_count(768, 768, 48, llc)
    assert n >= 48 and n * 768 * 768 * 4 >= B.COLD_FACTOR * llc
    # a model set smaller than the cache is raised above it; a larger one is kept
    assert B.cold_count(64, 64, 3, llc) * 64 * 64 * 4 >= B.COLD_FACTOR * llc
    assert B.cold_count(1024, 4096, 1000, llc) == 1000


def test_llc_bytes_positive():
    assert B.llc_bytes() > 0


def test_weight_set_distinct():
    ws = B.weight_set(8, 6, 4)
    assert len({w.data_ptr() for w in ws}) == 4
    assert not torch.equal(ws[0], ws[1])


def test_cycled_products_match_linear():
    weights = B.weight_set(40, 2048, 3)
    for rows in (1, 4):
        x = torch.randn(rows, 2048)
        fns = B.candidates(weights, x)
        assert set(fns) == {"F.linear", "skinny", "blocked-copy"}
        for name, fn in fns.items():
            seen = []
            for _ in range(2 * len(weights)):
                with torch.inference_mode():
                    y = fn()
                seen.append(fn.last)
                want = F.linear(x.double(), weights[fn.last].double()).float()
                # fp32 products over K = 2048 with different summation blocking: a few ulps of
                # the row norms (|y| ~ 1 here)
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4, msg=name)
            assert seen == [0, 1, 2, 0, 1, 2], name


def test_tiny_run_prints_both_sets(capsys):
    B.main(["--shapes", "16x2048x2", "--rows", "1,3", "--llc-mb", "0.25"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.lstrip().startswith("16x2048")]
    assert [ln.split()[1] for ln in lines] == ["warm", "warm", "cold", "cold"]
    cold = lines[-1].split()
    assert int(cold[2]) * 16 * 2048 * 4 >= B.COLD_FACTOR * 0.25 * 2 ** 20
    assert all(len(ln.split()) == 8 for ln in lines)   # shape set count MB rows + 3 rates
