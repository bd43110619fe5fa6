"""Miniature of DyStream's Table 3: how close a causal student gets to a full-context teacher as
a function of its lookahead.

    python -m benchmarks.distill_lookahead [--audio auto|espeak|synthetic] [--quick]

1. Audio: 16 kHz clips of locally generated speech, espeak-ng (random English word sequences,
   random voices, speeds and pitches; FFT-resampled from 22.05 kHz) when the espeak-ng binary is
   present, otherwise synthetic speech-like audio (voiced segments: harmonics of a drifting f0
   shaped by moving formants; fricatives: band-passed noise; pauses).
2. Teacher: a small full-context CausalEncoder (wav2vec2-style: valid conv front end, 20 ms
   frames, post-LN, RoPE, full bidirectional attention), pretrained HuBERT-style: spans of frames
   are replaced by a learned mask embedding and the model regresses the masked frames' log band
   energies (so it learns to use past and future context).
3. Students: the same architecture, initialised from the teacher, with banded attention of
   lookahead r = 0, 1, 2, 3 frames in the first layer (all later layers causal: total lookahead r
   frames = 20 r ms), distilled with pyencoder.distill (uniform layer-wise L2 over every layer
   output) on the same batches for the same number of steps.
4. Metric on held-out clips: relative distance ||s_l - t_l||^2 / ||t_l - mean(t_l)||^2 per layer,
   averaged over layers (and the last layer alone), before and after distillation.

Writes <results root>/<device>/distill_lookahead.jsonl and prints a Markdown table.
CPU, a few minutes.
"""
import argparse
import io
import math
import random
import shutil
import subprocess
import time
import wave

import torch

from benchmarks._common import env_info, write_jsonl
from pyencoder import distill as D
from pyencoder.models import CausalEncoder, EncoderConfig

SR = 16000

WORDS = ("the a one two three four five six seven eight nine ten water light stone river "
         "morning evening garden window paper music travel simple quiet yellow purple orange "
         "mountain little village yesterday tomorrow remember beautiful question answer number "
         "people family country animal picture problem station kitchen machine letter summer "
         "winter moment system thousand hundred silver golden market running jumping sleeping "
         "reading thinking through between because although however perhaps certainly always "
         "never sometimes often quickly slowly careful open close bring carry follow listen "
         "speak write think believe understand explain").split()


# ---- audio -------------------------------------------------------------------------------------

def _resample(x, sr_in, sr_out):
    n_out = int(round(x.shape[-1] * sr_out / sr_in))
    X = torch.fft.rfft(x.double())
    keep = n_out // 2 + 1
    Y = X[:keep] if X.shape[0] >= keep else torch.cat((X, X.new_zeros(keep - X.shape[0])))
    return (torch.fft.irfft(Y, n=n_out) * (n_out / x.shape[-1])).float()


def espeak_audio(seconds, rng):
    """About ``seconds`` of espeak-ng speech at 16 kHz (1-D float tensor)."""
    out, total = [], 0
    voices = ["en", "en-us", "en+m1", "en+m3", "en+m7", "en+f2", "en+f4", "en-us+m2", "en+f3"]
    while total < seconds * SR:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
        cmd = ["espeak-ng", "--stdout", "-v", rng.choice(voices), "-s", str(rng.randint(130, 210)),
               "-p", str(rng.randint(25, 75)), "-g", str(rng.randint(0, 6)), text]
        raw = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
        with wave.open(io.BytesIO(raw)) as w:
            sr = w.getframerate()
            pcm = w.readframes(w.getnframes())
        x = torch.frombuffer(bytearray(pcm), dtype=torch.int16).float() / 32768.0
        x = _resample(x, sr, SR)
        out.append(x)
        total += x.shape[0]
    return torch.cat(out)


def synthetic_audio(seconds, rng):
    """About ``seconds`` of speech-like audio at 16 kHz (1-D float tensor)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    N = int(seconds * SR)
    segs, t = [], 0
    while t < N:
        d = int(rng.uniform(0.06, 0.2) * SR)
        kind = rng.choices(["v", "f", "s"], [0.65, 0.2, 0.15])[0]
        formants = (rng.uniform(300, 900), rng.uniform(900, 2400), rng.uniform(2300, 3300))
        segs.append((t, min(N, t + d), kind, formants, rng.uniform(0.3, 1.0)))
        t += d
    # formant targets interpolated across segment centres (coarticulation)
    centres = torch.tensor([(a + b) / 2 for a, b, *_ in segs])
    targets = torch.tensor([f for *_, f, _ in segs])
    n = torch.arange(N, dtype=torch.float32)
    idx = torch.searchsorted(centres, n).clamp(1, len(segs) - 1) if len(segs) > 1 else None
    if idx is None:
        F = targets[0].expand(N, 3)
    else:
        c0, c1 = centres[idx - 1], centres[idx]
        a = ((n - c0) / (c1 - c0)).clamp(0, 1)[:, None]
        F = targets[idx - 1] * (1 - a) + targets[idx] * a
    f0 = rng.uniform(90, 220) * (1 + 0.15 * torch.sin(2 * math.pi * n / SR * rng.uniform(0.5, 3)
                                                      + rng.uniform(0, 6)))
    phase = 2 * math.pi * torch.cumsum(f0 / SR, 0)
    H = 32
    h = torch.arange(1, H + 1, dtype=torch.float32)[:, None]
    fh = h * f0[None]
    bw = torch.tensor([90.0, 120.0, 180.0])[:, None, None]
    amp = (torch.exp(-0.5 * ((fh[None] - F.T[:, None]) / bw) ** 2)
           * torch.tensor([1.0, 0.6, 0.3])[:, None, None]).sum(0) / h ** 0.5
    amp = amp * (fh < 7000)
    voiced = (amp * torch.sin(h * phase[None])).sum(0)
    noise = torch.randn(N, generator=g)
    Xn = torch.fft.rfft(noise)
    fr = torch.fft.rfftfreq(N, 1 / SR)
    noise = torch.fft.irfft(Xn * ((fr > 2500) & (fr < 7000)), n=N)
    env_v, env_f = torch.zeros(N), torch.zeros(N)
    ramp = int(0.01 * SR)
    for a, b, kind, _, gain in segs:
        e = torch.full((b - a,), gain)
        r = min(ramp, (b - a) // 2)
        if r:
            w = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, r))
            e[:r] *= w
            e[-r:] *= w.flip(0)
        if kind == "v":
            env_v[a:b] = e
        elif kind == "f":
            env_f[a:b] = e
    x = voiced * env_v / voiced.abs().max().clamp_min(1e-6) + 0.5 * noise * env_f / \
        noise.abs().max().clamp_min(1e-6) + 0.003 * torch.randn(N, generator=g)
    return x


def make_clips(n, seconds, source, seed):
    rng = random.Random(seed)
    gen = espeak_audio if source == "espeak" else synthetic_audio
    stream = gen(n * seconds * 1.05 + 1, rng)
    L = int(seconds * SR)
    clips = []
    for i in range(n):
        x = stream[i * L:(i + 1) * L]
        if x.shape[0] < L:
            x = torch.cat((x, gen(seconds, rng)[:L - x.shape[0]]))
        clips.append((x - x.mean()) / x.std().clamp_min(1e-4))
    return torch.stack(clips)


# ---- models ------------------------------------------------------------------------------------

def config(lookahead, args):
    return EncoderConfig(conv_dim=(args.conv_dim,) * 4, conv_kernel=(10, 8, 4, 4),
                         conv_stride=(5, 4, 4, 4), feat_extract_norm="layer", hidden_size=args.dim,
                         num_layers=args.layers, num_heads=args.heads, ffn_dim=2 * args.dim,
                         norm_first=False, pos_conv=None, attention="band", left=None,
                         lookahead=lookahead, lookahead_layers="first", rope=True)


def band_energies(wav, hop, n_bands=24):
    """Log band energies per frame (B, T, n_bands) over 25 ms windows ending at each frame's end."""
    win = 400
    x = torch.nn.functional.pad(wav, (win - hop, 0))
    frames = x.unfold(-1, win, hop) * torch.hann_window(win)
    P = torch.fft.rfft(frames).abs().pow(2)
    edges = torch.logspace(math.log10(2), math.log10(P.shape[-1] - 1), n_bands + 1).long()
    bands = torch.stack([P[..., edges[i]:max(edges[i + 1], edges[i] + 1)].mean(-1)
                         for i in range(n_bands)], -1)
    return torch.log(bands + 1e-4)


def masked_forward(model, wav, mask, mask_emb):
    """The encoder's forward with frames where ``mask`` (B, T) is True replaced by ``mask_emb``."""
    h, _ = model._embed(model.feature_extractor(wav))
    h = torch.where(mask[..., None], mask_emb.to(h.dtype), h)
    h = model._pos(h)
    if not model.config.norm_first:
        h = model.layer_norm(h)
    for layer in model.layers:
        h = layer(h)
    return model.layer_norm(h) if model.config.norm_first else h


def span_mask(B, T, prob, span, g):
    starts = torch.rand(B, T, generator=g) < prob / span
    m = torch.zeros(B, T, dtype=torch.bool)
    for s in range(span):
        m[:, s:] |= starts[:, :T - s]
    return m


def pretrain_teacher(teacher, train, args, log):
    g = torch.Generator().manual_seed(args.seed + 1)
    mask_emb = torch.nn.Parameter(torch.randn(args.dim) * 0.1)
    head = torch.nn.Linear(args.dim, 24)
    params = list(teacher.parameters()) + [mask_emb] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.teacher_steps,
                                                pct_start=0.1)
    hop = teacher.hop
    tgt_all = band_energies(train, hop)
    mu, sd = tgt_all.mean((0, 1)), tgt_all.std((0, 1))
    teacher.train()
    t0 = time.time()
    for step in range(args.teacher_steps):
        idx = torch.randint(0, train.shape[0], (args.batch,), generator=g)
        wav = train[idx]
        T = teacher.frame_lengths(wav.shape[-1])
        tgt = ((tgt_all[idx] - mu) / sd)[:, :T]
        m = span_mask(args.batch, T, 0.5, 5, g)
        y = head(masked_forward(teacher, wav, m, mask_emb))
        loss = ((y - tgt) ** 2).mean(-1)[m].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.teacher_steps - 1:
            log(f"  teacher step {step:4d}  masked-prediction loss {float(loss.detach()):.4f}  "
                f"({time.time() - t0:.0f} s)")
    teacher.eval()
    return float(loss.detach())


@torch.no_grad()
def evaluate(student, teacher, evalset, bs=16):
    num = None
    den = None
    for i in range(0, evalset.shape[0], bs):
        w = evalset[i:i + bs]
        s = student(w, output_hidden_states=True).hidden_states[1:]
        t = teacher(w, output_hidden_states=True).hidden_states[1:]
        n = torch.stack([(a - b).pow(2).sum() for a, b in zip(s, t)])
        d = torch.stack([(b - b.mean((0, 1))).pow(2).sum() for b in t])
        num = n if num is None else num + n
        den = d if den is None else den + d
    rel = (num / den).tolist()
    return dict(mean=sum(rel) / len(rel), last=rel[-1], per_layer=rel)


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--audio", choices=("auto", "espeak", "synthetic"), default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke testing")
    ap.add_argument("--lookaheads", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--conv-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--train-clips", type=int, default=192)
    ap.add_argument("--eval-clips", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--student-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps = 20, 10
        args.train_clips, args.eval_clips, args.seconds = 16, 8, 1.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    source = args.audio
    if source == "auto":
        source = "espeak" if shutil.which("espeak-ng") else "synthetic"
    elif source == "espeak" and not shutil.which("espeak-ng"):
        raise SystemExit("--audio espeak: the espeak-ng binary is not on PATH")
    t_start = time.time()
    clips = make_clips(args.train_clips + args.eval_clips, args.seconds, source, args.seed)
    train, evalset = clips[:args.train_clips], clips[args.train_clips:]
    log(f"audio: {source}, {clips.shape[0]} clips of {args.seconds} s "
        f"({time.time() - t_start:.0f} s)")

    teacher = CausalEncoder(config(None, args))
    log(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters, "
        f"{args.layers} layers, dim {args.dim}, frame {teacher.hop / SR * 1000:.0f} ms")
    pre_loss = pretrain_teacher(teacher, train, args, log)
    frontend_ms = (sum((k - s) * math.prod(config(0, args).conv_stride[:i])
                       for i, (k, s) in enumerate(zip(config(0, args).conv_kernel,
                                                      config(0, args).conv_stride)))) / SR * 1000

    rows = []
    for r in args.lookaheads:
        torch.manual_seed(args.seed + 100)
        student = CausalEncoder(config(r, args))
        student.load_state_dict(teacher.state_dict())
        before = evaluate(student.eval(), teacher, evalset)
        opt = torch.optim.AdamW(student.parameters(), lr=args.student_lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(args.seed + 2)     # same batches for every student
        batches = (train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
                   for _ in range(args.student_steps))
        t0 = time.time()
        hist = D.distill(student, teacher, batches, opt, weights="uniform")
        secs = time.time() - t0
        after = evaluate(student.eval(), teacher, evalset)
        lat = student.latency()
        rec = dict(bench="distill_lookahead", lookahead_frames=r, lookahead_ms=r * teacher.hop /
                   SR * 1000, latency_ms=lat.ms, frontend_lookahead_ms=frontend_ms,
                   rel_dist_before=before["mean"], rel_dist_after=after["mean"],
                   rel_dist_last_layer_after=after["last"], per_layer_after=after["per_layer"],
                   train_loss_first=hist[0]["loss"], train_loss_last=hist[-1]["loss"],
                   student_steps=args.student_steps, teacher_steps=args.teacher_steps,
                   teacher_pretrain_loss=pre_loss, audio=source, train_clips=args.train_clips,
                   eval_clips=args.eval_clips, seconds=args.seconds, dim=args.dim,
                   layers=args.layers, batch=args.batch, seed=args.seed, distill_seconds=secs,
                   dtype="float32", quick=args.quick)
        rows.append(rec)
        log(f"  lookahead {r} ({rec['lookahead_ms']:.0f} ms): relative distance "
            f"{before['mean']:.4f} -> {after['mean']:.4f} (last layer {after['last']:.4f}), "
            f"{secs:.0f} s")
    if not args.no_write:
        path = write_jsonl("distill_lookahead", rows)
        log(f"wrote {path}")
    env = env_info()
    print()
    print(f"Causal students distilled from a full-context teacher ({args.layers} layers, dim "
          f"{args.dim}, 20 ms frames; {source} audio, {args.student_steps} distillation steps of "
          f"{args.batch} x {args.seconds:g} s; {env.get('device_name', env.get('device'))}, "
          f"total {time.time() - t_start:.0f} s)")
    print()
    print("| lookahead | algorithmic latency | rel. distance before | rel. distance after | "
          "last layer after |")
    print("|---|---|---|---|---|")
    for rec in rows:
        print(f"| {rec['lookahead_frames']} frames ({rec['lookahead_ms']:.0f} ms) | "
              f"{rec['latency_ms']:.1f} ms | {rec['rel_dist_before']:.4f} | "
              f"{rec['rel_dist_after']:.4f} | {rec['rel_dist_last_layer_after']:.4f} |")


if __name__ == "__main__":
    main()
