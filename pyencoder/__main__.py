"""Command line: ``python -m pyencoder info | demo | latency``."""
import argparse
import sys


def _info(_args):
    import platform

    import torch

    import pyencoder
    from pyencoder import _backend
    print(f"pyencoder {pyencoder.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        note = _backend.triton_version_note(triton.__version__)
        print(f"triton {triton.__version__}" + (f" (warning: {note})" if note else
                                                f" (tested range {_backend.TRITON_SPEC})"))
    except ImportError as e:
        why = _backend.triton_import_reason(e)
        print("triton: " + ("not installed (optional: pip install 'pyencoder[triton]'; a CUDA "
                            "torch brings its own)" if why.startswith("triton is not installed")
                            else why))
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}")
    else:
        print("device: CPU only (no CUDA device)")
    print("backends:")
    for name, (ok, reason) in _backend.backend_info().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable'}"
              + ("" if ok else f": {reason}"))
    print("op families (implemented backends, auto order on CUDA; CPU auto: reference):")
    for fam in _backend.FAMILIES:
        print(f"  {fam:<17} {', '.join(_backend.auto_order(fam))}")
    from ._env import check_environment
    env = check_environment()
    print("PYENCODER_* environment:" + ("" if env else " none set"))
    bad = 0
    for name, raw, err, known in env:
        print(f"  {name}={raw!r}" + (f"  ERROR: {err}" if err else "") +
              ("" if known else "  (not read by pyencoder: a typo?)"))
        bad += err is not None
    if bad:
        print(f"{bad} PYENCODER_* variable(s) wrong (each raises ValueError where it is read)",
              file=sys.stderr)
        return 1
    return 0


def _int_at_least(lo, what):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}; got {v}")
        return v
    return parse


_pos_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _lookahead_layers(text):
    if text in ("first", "all"):
        return text
    try:
        return [_nonneg_int(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'first', 'all' or a comma list of per-layer lookaheads (ints >= 0, e.g. "
            f"1,1,1,0); got {text!r}")


def _latency(args):
    """Latency of a wav2vec2-base-geometry encoder with the given lookahead configuration."""
    try:
        from transformers import Wav2Vec2Config, Wav2Vec2Model
    except ImportError:
        raise SystemExit("latency: needs transformers (pip install 'pyencoder[hf]')")
    import warnings

    import torch

    import pyencoder.hf as phf
    cfg = Wav2Vec2Config(num_hidden_layers=args.layers)
    with torch.device("meta"):
        model = Wav2Vec2Model(cfg)
    with warnings.catch_warnings(record=True) as caught:   # 'all' compounds: said below
        warnings.simplefilter("always")
        phf.apply_pyencoder_to_wav2vec2(model, lookahead_frames=args.lookahead_frames,
                                        lookahead_layers=args.lookahead_layers, pos_conv="causal",
                                        group_norm="running")
    for w in caught:
        if "compounds" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    lat = phf.latency(model, sample_rate=args.sample_rate)
    sr, hop = lat.sample_rate, lat.hop
    print(f"per-layer lookahead frames: {lat.per_layer_lookahead}")
    print(f"attention lookahead: {lat.lookahead_frames} frames x {hop} samples "
          f"= {lat.attention_ms:.1f} ms")
    print(f"feature extractor:   receptive field - hop = {lat.frontend_lookahead_samples} "
          f"samples = {lat.frontend_ms:.1f} ms")
    print(f"total lookahead:     {lat.lookahead_samples} samples = {lat.lookahead_ms:.1f} ms at "
          f"{sr} Hz (a frame also spans its own {hop}-sample hop: "
          f"{lat.samples} samples = {lat.ms:.1f} ms in all)")
    return 0


def build_parser():
    """The command line parser: (parser, {subcommand: subparser})."""
    p = argparse.ArgumentParser(prog="python -m pyencoder")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends available on this machine and why not")
    d = sub.add_parser("demo", help="the main job: stream audio / run the kernels on this device")
    d.add_argument("--quick", action="store_true",
                   help="a shorter run: a 3 s clip (on a GPU also smaller kernel shapes and "
                        "fewer repeats; on a CPU the kernel run is always the short one)")
    d.add_argument("--checkpoint", default=None, help="local HF wav2vec2 model directory")
    lat = sub.add_parser(
        "latency", help="algorithmic latency of an encoder configuration",
        description="Exact algorithmic latency of a wav2vec2-geometry encoder (conv feature "
                    "extractor, hop 320 samples) patched by pyencoder.hf with the given lookahead "
                    "(needs transformers; nothing is downloaded or allocated).")
    lat.add_argument("--lookahead-frames", type=_nonneg_int, default=None, metavar="R",
                     help="frames of attention lookahead (default 3 = 60 ms at 16 kHz; not with "
                          "a comma list of --lookahead-layers, which gives each layer's)")
    lat.add_argument("--lookahead-layers", type=_lookahead_layers, default="first",
                     metavar="first|all|R0,R1,...",
                     help="where the lookahead goes: 'first' layer only (default), 'all' layers "
                          "(it compounds: layers x R frames), or one lookahead per layer as a "
                          "comma list of --layers ints")
    lat.add_argument("--layers", type=_pos_int, default=12, metavar="N",
                     help="transformer layers (default 12, wav2vec2-base)")
    lat.add_argument("--sample-rate", type=_pos_int, default=16000, metavar="HZ",
                     help="sample rate used to convert samples to ms (default 16000)")
    return p, {"demo": d, "latency": lat}


def main(argv=None):
    p, subs = build_parser()
    lat = subs["latency"]
    if not (sys.argv[1:] if argv is None else argv):
        p.print_help()          # no command: what there is to run (argparse said "cmd required")
        return 2
    args = p.parse_args(argv)
    if args.cmd == "info":
        return _info(args)
    if args.cmd == "demo":
        from ._demo import main as demo_main
        return demo_main(args)
    if args.cmd == "latency":
        if isinstance(args.lookahead_layers, list) and len(args.lookahead_layers) != args.layers:
            lat.error(f"--lookahead-layers: a comma list needs one lookahead per layer "
                      f"({args.layers} for --layers {args.layers}); got "
                      f"{len(args.lookahead_layers)} values")
        if isinstance(args.lookahead_layers, list) and args.lookahead_frames is not None:
            lat.error(f"--lookahead-frames ({args.lookahead_frames}) is not used with a comma "
                      f"list of --lookahead-layers (each layer's lookahead); give one or the "
                      f"other")
        if args.lookahead_frames is None:
            args.lookahead_frames = 3
        return _latency(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
