"""Run transformers' own Wav2Vec2 / HuBERT / WavLM model tests with pyencoder applied.

    python tests/external/transformers/run.py [--modes patch registry] [pytest args...]

Modes (see pyencoder_tf_plugin.py): ``patch`` applies apply_pyencoder_to_wav2vec2 at full-context
settings to every model the tests build; ``registry`` loads every model with
attn_implementation="pyencoder"; ``none`` is transformers unchanged. The test files live in the
git-ignored cache that fetch.py fills (.cache/transformers-tests/); when it is absent this script
prints a loud SKIPPED message and exits 0, so a clean checkout without the cache (CI) does not fail.
Tests that need what this harness lacks are skipped as in transformers' CI (RUN_SLOW unset,
HF_HUB_OFFLINE=1); tests refused by design are xfail(strict) via expected.py. Prints
passed / failed / refused / harness / skipped per family and mode; exit status 1 if any mode failed.
"""
import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CACHE = Path(os.environ.get("PYENCODER_TF_CACHE", ROOT / ".cache" / "transformers-tests"))
FAMILIES = ("wav2vec2", "hubert", "wavlm")
MODEL_TESTS = [f"tests/models/{f}/test_modeling_{f}.py" for f in FAMILIES]


def cache_ready():
    return all((CACHE / p).exists() for p in MODEL_TESTS) and (CACHE / "tests" / "test_modeling_common.py").exists()


def count(xml_path):
    out = {f: dict(passed=0, failed=0, refused=0, harness=0, skipped=0) for f in FAMILIES}
    for case in ET.parse(xml_path).iter("testcase"):
        fam = next((f for f in FAMILIES if f".{f}." in case.get("classname", "") + "."), None)
        if fam is None:
            continue
        kids = {c.tag: c for c in case}
        skipped = kids.get("skipped")
        if "failure" in kids or "error" in kids:
            out[fam]["failed"] += 1
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            refused = "refused by design" in (skipped.get("message") or "")
            out[fam]["refused" if refused else "harness"] += 1
        elif skipped is not None:
            out[fam]["skipped"] += 1
        else:
            out[fam]["passed"] += 1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["patch", "registry"],
                    choices=["patch", "registry", "none"])
    ap.add_argument("--out", type=Path, default=CACHE / "results")
    args, pytest_args = ap.parse_known_args(argv)
    if not cache_ready():
        bar = "!" * 78
        print(f"{bar}\nSKIPPED: transformers' model tests are not in {CACHE}.\n"
              f"Run `python tests/external/transformers/fetch.py` (needs PyPI; the model test files\n"
              f"need GitHub or an agent with the library tools, see fetch.py). Nothing was tested.\n{bar}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE / "stubs"), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("RUN_SLOW", None)
    rc_all = 0
    rows = []
    for mode in args.modes:
        xml = args.out / f"{mode}.xml"
        env["PYENCODER_TF_MODE"] = mode
        env["PYENCODER_TF_REPORT"] = str(args.out / f"{mode}.calls.jsonl")
        Path(env["PYENCODER_TF_REPORT"]).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-p", "pyencoder_tf_plugin", "-p", "no:cacheprovider",
               "-q", "-rfE", f"--junitxml={xml}", *MODEL_TESTS, *pytest_args]
        print(f"== mode {mode}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, cwd=CACHE, env=env)
        if rc not in (0, 5):
            rc_all = 1
        if xml.exists():
            for fam, c in count(xml).items():
                rows.append((mode, fam, c))
    print(f"\n{'mode':<9}{'family':<10}{'passed':>8}{'failed':>8}{'refused':>9}{'harness':>9}"
          f"{'skipped':>9}")
    for mode, fam, c in rows:
        print(f"{mode:<9}{fam:<10}{c['passed']:>8}{c['failed']:>8}{c['refused']:>9}{c['harness']:>9}"
              f"{c['skipped']:>9}")
    return rc_all


if __name__ == "__main__":
    sys.exit(main())
