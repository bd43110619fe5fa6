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
    except ImportError:
        print("triton: not installed (optional: pip install 'pyencoder[triton]'; a CUDA torch "
              "brings its own)")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}")
    else:
        print("device: CPU only (no CUDA device)")
    print("backends:")
    for name, (ok, reason) in _backend.backend_info().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable'}"
              + ("" if ok else f": {reason}"))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyencoder")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends available on this machine and why not")
    d = sub.add_parser("demo", help="the main job: stream audio / run the kernels on this device")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--checkpoint", default=None, help="local HF wav2vec2 model directory")
    lat = sub.add_parser("latency", help="algorithmic latency of an encoder configuration")
    lat.add_argument("--lookahead-frames", type=int, default=3)
    lat.add_argument("--lookahead-layers", default="first")
    lat.add_argument("--layers", type=int, default=12)
    lat.add_argument("--sample-rate", type=int, default=16000)
    args = p.parse_args(argv)
    if args.cmd == "info":
        return _info(args)
    if args.cmd == "demo":
        from ._demo import main as demo_main
        return demo_main(args)
    if args.cmd == "latency":
        from ._demo import latency_main
        return latency_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
