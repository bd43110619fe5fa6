"""Ops dispatched by one steady-state ``step_fixed`` of the bench_streaming stack, on the CPU.

At batch 1 the CUDA-graph step of benchmarks/bench_streaming.py is launch-bound: its time is
roughly the number of kernels it replays. This script counts them without a GPU: it builds the
bench_streaming model (``build``; widths do not change the op count, so small dims are the
default), warms a batch-1 state up with the general ``step`` to the steady state, runs one
``step_fixed`` outside the count (``check=True``: preconditions, and the per-state caches) and
then counts the aten ops that one ``step_fixed`` dispatches (a ``TorchDispatchMode``), per
module type (each op charged to the innermost module running it) and per TransformerLayer
(inclusive). Nothing is timed.

Counted: every aten op except
  * views and metadata (no kernel): ops whose schema returns an alias of an input
    (``OpOverload.is_view``: view, _unsafe_view, _reshape_alias, expand, transpose, t, permute,
    select, slice, as_strided, unsqueeze, squeeze, alias, detach, unfold, ...) and the names in
    ``EXCLUDED``;
  * allocations (``ALLOCS``: empty, empty_strided, empty_like, new_empty, new_empty_strided):
    no kernel; counted apart (under a CUDA graph they come from the graph's private pool).
Calls run as on the device: the counting dispatch mode is not reported to pyencoder's eager
fast path (``pyencoder.ops._call.route``), so a registered op runs its body directly where the
device would, not the op (e.g. an output-only conv call on the cuDNN route makes no final state).
A foreach op (``_foreach_add_``: the stack's stream counters, ``batched_counters``) counts as one
(CUDA runs its list of same-dtype tensors as one multi-tensor kernel). A Triton launch counts as
one kernel (``triton:<kernel>``); a registered op (``pyencoder::...``)
counts as one unless it launched Triton kernels (then only those count). Host synchronisations
(``_local_scalar_dense``, i.e. ``.item()`` / ``int(t)`` / ``bool(t)``) are counted apart as
``syncs``: a capturable step must have none.

Paths (``--path``):
  * ``cpu``: what the CPU runs: the reference decode attention and conv, the plain-torch ring
    write (``_ring.fused_ok`` is False off CUDA), ``PYENCODER_CPU_SKINNY_GEMM=0`` (the transposed
    CPU product is a CPU-only path; the GPU runs F.linear).
  * ``cuda``: what a CUDA step dispatches, emulated on CPU tensors: the Triton backends of decode
    attention and conv (``use_backend(decode_attention="triton", conv="triton")``; a CUDA build's
    depthwise convs would run ``pyencoder._C``'s kernels instead), dense strided convs (the
    feature extractor's) through the cuda backend's cuDNN route as a CUDA build runs them (plain
    torch ops: cat, F.conv1d, activation, final state), the fused ring write
    (``_ring.FORCE_INTERPRET``), the q/k/v weights packed for one GEMM (``pack_qkv_``, which
    init_state does on CUDA), every Triton launch stubbed (counted, not run: no interpreter,
    outputs left unwritten).
  * ``cuda-torch-ring``: ``cuda`` with ``PYENCODER_FUSED_RING=0``: the plain-torch ring write (the
    rope of the new keys, the k / v / q index_put_ and their index arithmetic) that the fused
    ring write replaces by one launch.

Usage: python -m benchmarks.count_step_kernels [--mask banded|chunked|both]
       [--path cpu|cuda-torch-ring|cuda|all] [--layers 12] [--dtype bfloat16] [--post-ln]
       [--model stack|encoder|decoder] [--adapter N] [--call step_fixed|step|step-no-dispatch]
       [--ops] [--json]
Prints a table per mask and path (total, per module type, per layer).
"""
import argparse
import collections
import contextlib
import json
import math
import os
import sys

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import temp_env  # noqa: E402
from benchmarks.bench_streaming import (GPU_MASKS, HOP, build, build_encoder,  # noqa: E402
                                        _warm_steps)
from pyencoder.nn import TransformerLayer  # noqa: E402

# Ops that launch no kernel beyond the is_view ones (metadata / aliasing).
EXCLUDED = frozenset({"view", "_unsafe_view", "_reshape_alias", "expand", "transpose", "t",
                      "permute", "select", "slice", "as_strided", "detach", "alias", "unsqueeze",
                      "squeeze", "unfold", "split", "unbind", "lift_fresh", "sym_size",
                      "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
                      "_nested_tensor_size", "set_", "resolve_conj", "resolve_neg"})
ALLOCS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"})
SYNCS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal"})

DIMS = dict(dim=64, heads=4, ffn=128, conv_dim=32)
PATHS = ("cpu", "cuda-torch-ring", "cuda")


# ops whose CUDA implementation makes a non-contiguous input contiguous first (a copy kernel the
# dispatch mode does not see): counted as one more kernel
HIDDEN_CONTIGUOUS = ("native_layer_norm",)


class _Counter(TorchDispatchMode):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.ops = collections.Counter()          # (module path, op name) -> count
        self.excluded = collections.Counter()     # op name -> count
        self.allocs = collections.Counter()       # module path -> count
        self.syncs = collections.Counter()        # (module path, op name) -> count
        self.launches = 0

    def record(self, name):
        self.launches += 1
        self.ops[(tuple(self.stack), name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        where = tuple(self.stack)
        if name in SYNCS:
            self.syncs[(where, name)] += 1
        elif name in ALLOCS:
            self.allocs[where] += 1
        elif func.is_view or name in EXCLUDED:
            self.excluded[name] += 1
        elif func.namespace not in ("aten", "prims"):
            body = _op_body(func, args)
            if body is not None:
                # a registered op whose body is plain torch ops on the GPU too: count those
                with self:
                    return body(*args, **(kwargs or {}))
            # a registered op (pyencoder::...): one kernel, unless it launched Triton kernels,
            # which are counted themselves (the op is then only their host wrapper)
            before = self.launches
            out = func(*args, **(kwargs or {}))
            if self.launches == before:
                self.ops[(where, f"{func.namespace}::{name}")] += 1
            return out
        else:
            self.ops[(where, name)] += 1
            if name in HIDDEN_CONTIGUOUS and isinstance(args[0], torch.Tensor) and \
                    not args[0].is_contiguous():
                # a copy kernel inside the op on CUDA (its input made contiguous first)
                self.ops[(where, "copy (inside " + name + ")")] += 1
        return func(*args, **(kwargs or {}))


def _op_body(func, args):
    """The body of a registered op that runs plain torch ops on a GPU as on these CPU tensors,
    else None: the conv op on the cuda backend's cuDNN route (dense strided convs)."""
    if func.namespace == "pyencoder" and func.overloadpacket.__name__ == "causal_conv1d" \
            and args[-1] == "cuda":
        from pyencoder.ops import _conv_cuda
        if _conv_cuda._kind(args[0], args[1], args[4], args[5]) == "cudnn":
            def body(x, weight, bias, initial_state, stride, groups, activation, backend):
                return _conv_cuda.forward(x, weight, bias, initial_state, stride, groups,
                                          activation or None)
            return body
    return None


@contextlib.contextmanager
def _tracked(model, stack):
    """Push (label, module type) while a module's forward or step_fixed runs (instance-level
    wrappers, not hooks: a module with hooks may take another path, e.g. no packed q/k/v)."""
    patched = []
    names = {m: n for n, m in model.named_modules()}

    for m in model.modules():
        for attr in ("forward", "step_fixed"):
            if not hasattr(type(m), attr):
                continue
            orig = getattr(type(m), attr)

            def wrapped(*a, _m=m, _f=orig, **k):
                stack.append((names[_m] or "<root>", type(_m).__name__))
                try:
                    return _f(_m, *a, **k)
                finally:
                    stack.pop()
            m.__dict__[attr] = wrapped
            patched.append((m, attr))
    try:
        yield
    finally:
        for m, attr in patched:
            del m.__dict__[attr]


@contextlib.contextmanager
def _fused_path(counter_ref):
    """Triton backends, the fused ring write (where PYENCODER_FUSED_RING allows) and stubbed
    launches (module docstring)."""
    import pyencoder
    from pyencoder.ops import _ring_write_triton as ring
    from pyencoder.ops import _triton_op

    def fake_launch(self, *args, **kwargs):
        c = counter_ref[0]
        if c is not None:
            c.record("triton:" + _kernel_name(self.kernel))
        return None

    from pyencoder import _backend
    from pyencoder.ops import _conv_cuda
    real_select = _backend.select

    def select(family, entry, device_type, args, backend=None):
        # the CUDA build's routing of dense strided convs: cuDNN through the cuda backend (plain
        # torch ops: they run on these CPU tensors as on the GPU)
        if family == "conv" and entry == "forward" and _conv_cuda._kind(
                args["x"], args["weight"], args["stride"], args["groups"]) == "cudnn":
            return "cuda"
        return real_select(family, entry, device_type, args, backend)

    old = (os.environ.get("TRITON_INTERPRET"), ring.FORCE_INTERPRET, _triton_op._Launch.__call__)
    os.environ["TRITON_INTERPRET"] = "1"
    ring.FORCE_INTERPRET = True
    _triton_op._Launch.__call__ = fake_launch
    _backend.select = select
    try:
        with pyencoder.use_backend(decode_attention="triton", conv="triton"):
            yield
    finally:
        _backend.select = real_select
        if old[0] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old[0]
        ring.FORCE_INTERPRET = old[1]
        _triton_op._Launch.__call__ = old[2]


def _kernel_name(kernel):
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


@contextlib.contextmanager
def _observer_not_a_mode():
    """The eager fast path as the device takes it: pyencoder's ops skip their registered op (and
    run the body directly, pyencoder.ops._call.route) only without a Python dispatch mode, and
    the counting mode is one; it only observes, so it is not reported as one here."""
    from pyencoder.ops import _call
    real = _call._get_current_dispatch_mode

    def current():
        mode = real()
        return None if isinstance(mode, _Counter) else mode
    _call._get_current_dispatch_mode = current
    try:
        yield
    finally:
        _call._get_current_dispatch_mode = real


CALLS = ("step_fixed", "step", "step-no-dispatch")


def _decoder(dims):
    """FocalCodec-Stream's decoder shape (pyencoder.models.DecoderConfig's defaults: a causal conv
    embed, LayerNorm, 8 ConvNeXt blocks, LayerNorm, Linear to 320 samples per frame) at the
    count's small widths; its steps are 4 frames (80 ms at 50 Hz)."""
    from pyencoder.models import DecoderConfig, StreamingDecoder
    return StreamingDecoder(DecoderConfig(input_dim=dims["dim"], dim=dims["dim"],
                                          intermediate_dim=dims["ffn"])).eval()


def count(mask="banded", path="cuda", layers=12, dtype=torch.bfloat16, dims=None, seed=0,
          norm_first=True, model="stack", call="step_fixed", extractor="group", adapter=0):
    """One steady-state step_fixed of the bench_streaming stack (``model="stack"``) or of the
    converted wav2vec2-base CausalEncoder (``"encoder"``: bench_streaming.build_encoder; its
    ``norm_first`` is post-LN unless given True) -> dict with ``total`` (kernels),
    ``call="step"``: the eager general ``step`` in the steady state instead (it runs as
    step_fixed: pyencoder.streaming.state.steady_dispatch, on fresh counters);
    ``"step-no-dispatch"``: the general step itself (PYENCODER_STEADY_DISPATCH=0); both count
    their host reads (``syncs``), which a step_fixed has none of.
    ``by_type`` {module type: ops charged to it}, ``per_layer`` [ops of each TransformerLayer,
    inclusive], ``ops`` {op name: count}, ``allocs``, ``syncs`` and ``excluded`` {name: count}.
    ``adapter``: the encoder with that many conv adapter layers (stride 2 each) after it; the step
    then covers a whole multiple of the adapter's stride (``step_frames`` in the result)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}; got {call!r}")
    cfg = dict(GPU_MASKS[mask])
    sf = cfg.pop("step_frames")
    torch.manual_seed(seed)
    if model not in ("stack", "encoder", "decoder"):
        raise ValueError(f"model must be 'stack', 'encoder' or 'decoder'; got {model!r}")
    if adapter and model != "encoder":
        raise ValueError("adapter is the encoder's option (model='encoder')")
    sf = math.lcm(sf, 2 ** adapter)
    if model == "stack":
        model = build(layers=layers, **(dims or DIMS), **cfg, norm_first=norm_first)
        x = torch.randn(1, 1, HOP * sf, dtype=dtype)
    elif model == "encoder":
        model = build_encoder(layers=layers, **(dims or DIMS), **cfg, norm_first=norm_first,
                              feat_norm=extractor, adapter_layers=adapter)
        x = torch.randn(1, 1, HOP * sf, dtype=dtype)
    else:
        model, sf = _decoder(dims or DIMS), 4
        x = torch.randn(1, sf, model.config.input_dim, dtype=dtype)
    model = model.to(dtype)
    x = x.to(dtype)
    stack = []
    ref = [None]
    cuda = path != "cpu"
    ctx = _fused_path(ref) if cuda else contextlib.nullcontext()
    ring = "0" if path == "cuda-torch-ring" else "1"
    dispatch = "0" if call == "step-no-dispatch" else "1"
    with torch.no_grad(), temp_env(PYENCODER_CPU_SKINNY_GEMM="0", PYENCODER_FUSED_RING=ring,
                                   PYENCODER_STEADY_DISPATCH=dispatch):
        if cuda:                  # what init_state does for a CUDA state
            for m in model.modules():
                if hasattr(m, "pack_qkv_"):
                    m.pack_qkv_()
        st = model.init_state(1, dtype=dtype, max_chunk=sf)
        for _ in range(3 if hasattr(model, "net") else _warm_steps(model, sf)):
            model.step(torch.randn_like(x), st)
        with ctx:
            if call == "step_fixed":
                model.step_fixed(x, st, check=True)
                model.step_fixed(x, st)
                run = lambda: model.step_fixed(x, st)  # noqa: E731
            else:
                for _ in range(2):
                    model.step(x, st)
                run = lambda: model.step(x, st)  # noqa: E731
            with _tracked(model, stack):
                counter = _Counter(stack)
                ref[0] = counter
                with counter, _observer_not_a_mode():
                    run()
                ref[0] = None
    return dict(_summary(model, counter), step_frames=sf)


def _summary(model, c):
    by_type = collections.Counter()
    by_type_op = collections.Counter()
    per_layer = collections.Counter()
    ops = collections.Counter()
    layer_names = [n for n, m in model.named_modules() if isinstance(m, TransformerLayer)]
    for (where, name), k in c.ops.items():
        by_type[where[-1][1] if where else "<outside>"] += k
        ops[name] += k
        by_type_op[(where[-1][1] if where else "<outside>", name)] += k
        for label, _ in where:
            if label in layer_names:
                per_layer[label] += k
                break
    return dict(total=sum(ops.values()), by_type=dict(by_type.most_common()),
                per_layer=[per_layer[n] for n in layer_names], ops=dict(ops.most_common()),
                by_type_op={f"{t}.{o}": k for (t, o), k in sorted(by_type_op.items())},
                allocs=sum(c.allocs.values()), syncs=sum(c.syncs.values()),
                excluded=dict(c.excluded.most_common()))


def format_table(results):
    """results: {(mask, path): count() dict} -> printable table."""
    keys = list(results)
    types = []
    for r in results.values():
        types += [t for t in r["by_type"] if t not in types]
    head = ["", *[f"{m}/{p}" for m, p in keys]]
    rows = [["total kernels", *[r["total"] for r in results.values()]]]
    rows.append(["per layer (mean)", *[
        f"{sum(r['per_layer']) / max(1, len(r['per_layer'])):.1f}" for r in results.values()]])
    rows.append(["layer 0 / layer 1", *[
        "/".join(str(v) for v in r["per_layer"][:2]) for r in results.values()]])
    rows.append(["outside layers", *[r["total"] - sum(r["per_layer"]) for r in results.values()]])
    rows += [[f"  {t}", *[r["by_type"].get(t, 0) for r in results.values()]] for t in types]
    rows.append(["allocations (not counted)", *[r["allocs"] for r in results.values()]])
    rows.append(["host syncs", *[r["syncs"] for r in results.values()]])
    w0 = max(len(str(r[0])) for r in rows + [head])
    ws = [max(len(str(r[i])) for r in rows + [head]) for i in range(1, len(head))]
    line = lambda r: "  ".join([str(r[0]).ljust(w0)] + [str(v).rjust(w) for v, w in  # noqa: E731
                                                          zip(r[1:], ws)])
    return "\n".join([line(head)] + [line(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--mask", choices=("banded", "chunked", "both"), default="both")
    ap.add_argument("--path", choices=PATHS + ("all",), default="all")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--ops", action="store_true", help="also list the counted ops by name")
    ap.add_argument("--post-ln", action="store_true",
                    help="post-LN layers (wav2vec2-base's) instead of the benchmark's pre-LN")
    ap.add_argument("--model", choices=("stack", "encoder", "decoder"), default="stack",
                    help="the bench_streaming stack, or the converted wav2vec2-base CausalEncoder "
                         "(running GroupNorm, valid convs, positional conv; post-LN unless "
                         "--pre-ln): its whole-encoder step_fixed, or the StreamingDecoder "
                         "(FocalCodec-Stream's ConvNeXt decoder)")
    ap.add_argument("--pre-ln", action="store_true", help="--model encoder: pre-LN layers")
    ap.add_argument("--extractor", choices=("group", "layer"), default="group",
                    help="--model encoder: wav2vec2-base's conv extractor (a GroupNorm after the "
                         "first conv) or the large models' (a LayerNorm after every conv)")
    ap.add_argument("--adapter", type=int, default=0, metavar="N",
                    help="--model encoder: N conv adapter layers (config.add_adapter, stride 2 "
                         "each) after it; the step covers a multiple of their stride")
    ap.add_argument("--call", choices=CALLS, default="step_fixed",
                    help="what to count: the CUDA-graph step (default), the eager general step "
                         "in the steady state (it runs as step_fixed), or the general step with "
                         "that dispatch off (PYENCODER_STEADY_DISPATCH=0); the latter two also "
                         "count host reads")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)
    masks = ["banded", "chunked"] if args.mask == "both" else [args.mask]
    if args.model == "decoder":
        masks = masks[:1]                  # no attention: the mask does not matter
    paths = list(PATHS) if args.path == "all" else [args.path]
    dtype = getattr(torch, args.dtype)
    if args.model == "encoder":
        if args.post_ln:
            ap.error("--post-ln is the stack's option (the encoder is post-LN unless --pre-ln)")
        nf = args.pre_ln
    else:
        if args.pre_ln:
            ap.error("--pre-ln is the encoder's option (the stack is pre-LN unless --post-ln)")
        nf = not args.post_ln
    if args.extractor != "group" and args.model != "encoder":
        ap.error("--extractor is the encoder's option (--model encoder)")
    if args.adapter and args.model != "encoder":
        ap.error("--adapter is the encoder's option (--model encoder)")
    if args.adapter < 0:
        ap.error(f"--adapter must be >= 0; got {args.adapter}")
    results = {(m, p): count(m, p, args.layers, dtype, norm_first=nf, model=args.model,
                             call=args.call, extractor=args.extractor, adapter=args.adapter)
               for m in masks for p in paths}
    if args.json:
        print(json.dumps({f"{m}/{p}": r for (m, p), r in results.items()}))
        return results
    what = "bench_streaming stack" if args.model == "stack" else \
        "converted wav2vec2-base CausalEncoder" + \
        (f" + a {args.adapter}-layer conv adapter" if args.adapter else "")
    frames = sorted({r["step_frames"] for r in results.values()})
    what += f", {'/'.join(map(str, frames))}-frame steps"
    if args.model == "decoder":
        print(f"ops per {args.call}, batch 1, {args.dtype} (StreamingDecoder, FocalCodec-Stream's "
              f"shape: 8 ConvNeXt blocks, 320 samples a frame; 4-frame steps, small dims)")
    else:
        print(f"ops per {args.call}, batch 1, {args.layers} {'pre' if nf else 'post'}-LN "
              f"layers, {args.dtype} ({what}, small dims)")
    print(format_table(results))
    if args.ops:
        for (m, p), r in results.items():
            print(f"\n{m}/{p}: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
            print("  by module type: " + ", ".join(f"{k} {v}" for k, v in
                                                   r["by_type_op"].items()))
    ex = collections.Counter()
    for r in results.values():
        ex.update(r["excluded"])
    print("\nexcluded (views / metadata): " + ", ".join(f"{k} {v}" for k, v in ex.items()))
    return results


if __name__ == "__main__":
    main()
