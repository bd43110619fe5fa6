"""Every ```python block of README.md runs as written, with tiny sizes.

Substitutions: HTML comments on their own lines right above a block (blank lines allowed between),

    <!-- readme-test: replace `OLD` with `NEW` -->

replace every occurrence of OLD in the block by NEW, in order (a marker whose OLD is not in the
block fails the test, so markers cannot go stale). They shrink sizes and swap a checkpoint for a
tiny random model; they are invisible in the rendered README. `<!-- readme-test: skip REASON -->`
skips a block (none does today). The `python -m pyencoder latency` output shown in the README is
checked against the command's output.
"""
import contextlib
import io
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARK = re.compile(r"^<!-- readme-test: (.*) -->$")
REPLACE = re.compile(r"^replace `(.+?)` with `(.*)`$")


def blocks(text=None):
    """[(line number, directives, code)] for every ```python block."""
    lines = (text if text is not None else open(README).read()).splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = i - 1
            directives = []
            while j >= 0 and (not lines[j].strip() or MARK.match(lines[j].strip())):
                m = MARK.match(lines[j].strip())
                if m:
                    directives.insert(0, m.group(1))
                j -= 1
            k = i + 1
            while lines[k].strip() != "```":
                k += 1
            out.append((i + 1, directives, "\n".join(lines[i + 1:k]) + "\n"))
            i = k
        i += 1
    return out


def prepare(directives, code):
    """The block's code after its substitutions, or None if it is skipped."""
    for d in directives:
        if d.startswith("skip"):
            return None
        m = REPLACE.match(d)
        if not m:
            raise ValueError(f"unknown readme-test directive {d!r}")
        old, new = m.groups()
        if old not in code:
            raise ValueError(f"readme-test marker is stale: {old!r} is not in the block")
        code = code.replace(old, new)
    return code


BLOCKS = blocks()


def test_marker_parser():
    text = ("x\n<!-- readme-test: replace `a` with `bb` -->\n\n"
            "<!-- readme-test: replace `bb` with `c` -->\n```python\na = 1\n```\n"
            "```python\nq = 2\n```\n")
    (l1, d1, c1), (l2, d2, c2) = blocks(text)
    assert prepare(d1, c1) == "c = 1\n" and d2 == [] and c2 == "q = 2\n"
    with pytest.raises(ValueError, match="stale"):
        prepare(["replace `zz` with `y`"], "a = 1\n")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line, directives, code", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, directives, code, tmp_path, monkeypatch):
    code = prepare(directives, code)
    if code is None:
        pytest.skip(f"README block at line {line} is marked skip")
    if "transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_readme_latency_output_matches_the_command():
    pytest.importorskip("transformers")
    text = open(README).read()
    m = re.search(r"^\$ python -m pyencoder latency (.*)\n(.*)$", text, re.M)
    assert m, "the README shows a `python -m pyencoder latency` run"
    from pyencoder.__main__ import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["latency", *m.group(1).split()]) == 0
    assert m.group(2).strip() in out.getvalue()


def test_tables_show_what_ran():
    """The contention table labelled the auto policy with torch's default thread count (2) where
    the policy ran 1; a `--quick` run at the commit of a full one mixed its rows in (2 layers and
    1 s of audio under a 12-layer header); an all-quick table did not say so."""
    from benchmarks import readme
    env = dict(device="cpu-x86-64", torch="2.13", commit="abc", run_id="R1")
    rows = [dict(env, bench="cpu_contention", op="banded N=1500", provider="reference",
                 policy="auto", threads=2, auto_threads=[1], burners=1, median_ms=61.5,
                 speedup_vs_sdpa_default=1.86)]
    assert "reference auto (1 thr)" in readme.cpu_contention(rows)
    full = [dict(env, mode="offline", x=1), dict(env, mode="streaming", x=2)]
    quick = [dict(env, run_id="R2", mode="offline", x=3, quick=True)]
    assert readme._full_runs(full + quick) == full
    assert readme._full_runs(quick) == quick
    assert "`--quick` run" in readme._meta(quick) and "--quick" not in readme._meta(full)
