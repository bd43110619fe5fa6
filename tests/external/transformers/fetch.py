"""Rebuild the git-ignored cache of transformers' own tests that ``run.py`` runs against pyencoder.

    python tests/external/transformers/fetch.py            # into .cache/transformers-tests/

What goes where (nothing of it is committed: the cache is in .gitignore):

1. The shared test utilities (tests/test_modeling_common.py, test_configuration_common.py,
   test_pipeline_mixin.py, ... every tests/*.py that the transformers sdist ships) come from the
   sdist of the *installed* transformers release, downloaded from PyPI with pip. This step runs
   anywhere PyPI is reachable and matches the installed version exactly.
2. The model test files (MODEL_FILES below) are not in the sdist. They are taken from GitHub raw
   files at the recorded commit when GitHub is reachable. Where it is not (the development machines
   of this project), an agent with the library tools (find_files / read_file on the repository
   huggingface/transformers) transcribes them at the recorded commit into the cache; the recorded
   sha256 lets it check that a transcription matches the one the README counts were made with.
   Those transcriptions leave out what cannot run here, each place marked "[cache note]": the @slow
   integration classes (checkpoint + dataset downloads, skipped without RUN_SLOW anyway), tests that
   download hf-internal-testing tiny models from the Hub, and torch.fx code removed in
   transformers 5; Wav2Vec2ForMaskedLM (removed in 5.0) is dropped from wav2vec2's class lists.
3. Small stand-ins written by this script (STUBS): the parts of transformers' tests/ tree that
   the sdist lacks and that the three families do not exercise.

Without network and without a transcription, the script says what is missing and exits 1; run.py
(and `make test-transformers`) then skip loudly.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

REPO = "huggingface/transformers"
# path -> (commit of the stored version used, sha256 of the cached transcription)
MODEL_FILES = {
    "tests/models/wav2vec2/test_modeling_wav2vec2.py": (
        "01080c629600d4ff3121446bb4f4a2e240c2cf41",
        "189488298be906d9f19645feef046edc7565bfdd0bff01fa2d178af7659542b6"),
    "tests/models/hubert/test_modeling_hubert.py": (
        "cf3811da3e3251612424e231720ec3263746aaf2",
        "2615d4395441ec998b8c11466e33d0fbea9ab14851c6cca363a08a37f8746f14"),
    "tests/models/wavlm/test_modeling_wavlm.py": (
        "08ace7414b4a9c387b49833857de1d5f7679ddbb",
        "92d9606f5cb369a074d8c16e7fe06c910d656236825b5b8d96a30927f4806e0d"),
}
# config_common_kwargs only, from this stored version (a 4.x one: the sdist lacks tests/utils/)
CONFIG_UTILS = ("tests/utils/test_configuration_utils.py", "03c3b74168a3317deba1ca82822faf741c6b326d")

STUBS = {
    "tests/exporters/test_export.py":
        'class ExportTesterMixin:\n'
        '    """harness stub: the torch.export tests (tests/exporters/test_export.py) are not fetched"""\n',
    "tests/generation/test_utils.py":
        'class GenerationTesterMixin:\n'
        '    """harness stub: generation tests do not apply to encoders"""\n',
    # the pipeline tests need the Hub's tiny models; an empty summary makes them skip
    "tests/utils/tiny_model_summary.json": "{}\n",
}
PACKAGES = ["tests", "tests/models", "tests/models/wav2vec2", "tests/models/hubert",
            "tests/models/wavlm", "tests/exporters", "tests/generation", "tests/utils"]

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CACHE = ROOT / ".cache" / "transformers-tests"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_sdist_utils(cache, version):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"transformers=={version}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    dest = cache / "tests" / parts[2]
                    dest.write_bytes(tar.extractfile(m).read())


def fetch_model_file(cache, path, commit):
    url = f"https://raw.githubusercontent.com/{REPO}/{commit}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            text = r.read()
    except OSError as e:
        return f"{path}: GitHub not reachable ({e.__class__.__name__}); transcribe it at {commit}"
    dest = cache / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(text)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--check", action="store_true", help="only report what the cache holds")
    args = ap.parse_args(argv)
    import transformers

    cache = args.cache
    missing = []
    if not args.check:
        for pkg in PACKAGES:
            (cache / pkg).mkdir(parents=True, exist_ok=True)
            (cache / pkg / "__init__.py").touch()
        fetch_sdist_utils(cache, transformers.__version__)
        for rel, text in STUBS.items():
            (cache / rel).write_text(text)
        src = cache / "src"
        src.mkdir(exist_ok=True)
        link = src / "transformers"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(transformers.__file__).parent)
        (cache / "VERSION").write_text(transformers.__version__ + "\n")
    for path, (commit, digest) in MODEL_FILES.items():
        dest = cache / path
        if not dest.exists() and not args.check:
            err = fetch_model_file(cache, path, commit)
            if err:
                missing.append(err)
                continue
        if not dest.exists():
            missing.append(f"{path}: not in the cache (commit {commit})")
        elif digest and sha256(dest) != digest:
            print(f"note: {path} differs from the recorded transcription (sha256 {sha256(dest)})")
    if not (cache / CONFIG_UTILS[0]).exists():
        missing.append(f"{CONFIG_UTILS[0]}: transcribe config_common_kwargs at {CONFIG_UTILS[1]}")
    for m in missing:
        print("MISSING:", m)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
