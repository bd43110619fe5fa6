"""pyencoder.distill: layer weights, masked hidden-state loss, positional-embedding loss, the
distill() loop (loss decreases) and DDP exactness: a 2-process gloo run on CPU gives the same
gradients as one process on the concatenated batch, with ranks holding different numbers of valid
frames (float64, 1e-10)."""
import copy
import os
import tempfile

import pytest
import torch

import _subproc
from pyencoder import distill as D
from pyencoder.models import CausalEncoder, EncoderConfig


def tiny(lookahead=1, **over):
    kw = dict(conv_dim=(8, 8), conv_kernel=(10, 4), conv_stride=(5, 4), feat_extract_norm="layer",
              hidden_size=16, num_layers=2, num_heads=2, ffn_dim=24, pos_conv="causal",
              pos_conv_kernel=4, pos_conv_groups=4, left=None, lookahead=lookahead,
              lookahead_layers="first")
    kw.update(over)
    return EncoderConfig(**kw)


def test_layer_weights():
    assert D.layer_weights(4) == [0.25] * 4
    w = D.layer_weights(4, "reversed_linear")
    assert w == sorted(w, reverse=True) and abs(sum(w) - 1) < 1e-12 and w[0] == 4 * w[-1]
    w = D.layer_weights(3, "linear")
    assert w == sorted(w) and abs(sum(w) - 1) < 1e-12
    assert D.layer_weights(2, [1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="schedule"):
        D.layer_weights(2, "cosine")
    with pytest.raises(ValueError, match="schedule"):
        D.layer_weights(2, [1, 2, 3])


def test_hidden_state_loss_masks_padding():
    s = [torch.randn(2, 7, 4, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(2, 7, 4, dtype=torch.float64) for _ in range(2)]
    lengths = torch.tensor([7, 3])
    loss, per = D.hidden_state_loss(s, t, "reversed_linear", lengths)
    w = D.layer_weights(2, "reversed_linear")
    exp = [torch.cat([(a[0] - b[0]).pow(2), (a[1, :3] - b[1, :3]).pow(2)]).mean()
           for a, b in zip(s, t)]
    torch.testing.assert_close(per, torch.stack(exp))
    torch.testing.assert_close(loss, w[0] * exp[0] + w[1] * exp[1])
    t2 = [x.clone() for x in t]
    for x in t2:
        x[1, 3:] = 1e6
    torch.testing.assert_close(D.hidden_state_loss(s, t2, "reversed_linear", lengths)[0], loss)


def test_hidden_state_loss_ignores_nonfinite_padding():
    """inf / NaN in padded frames of teacher and student: same loss and gradient as finite ones
    (the mask selects; multiplying by 0 gave NaN)."""
    s = [torch.randn(3, 9, 5, requires_grad=True) for _ in range(2)]
    t = [torch.randn(3, 9, 5) for _ in range(2)]
    lengths = torch.tensor([9, 4, 6])
    loss, per = D.hidden_state_loss(s, t, "linear", lengths)
    grads = torch.autograd.grad(loss, s)
    sp = [x.detach().clone() for x in s]
    tp = [x.clone() for x in t]
    for b, n in enumerate(lengths.tolist()):
        tp[0][b, n:] = float("inf")
        tp[1][b, n:, 1] = float("nan")
        sp[1][b, n:, 0] = float("-inf")
    sp = [x.requires_grad_(True) for x in sp]
    loss2, per2 = D.hidden_state_loss(sp, tp, "linear", lengths)
    assert torch.equal(loss2, loss) and torch.equal(per2, per)
    for g, g2 in zip(grads, torch.autograd.grad(loss2, sp)):
        assert torch.equal(g2, g)


def test_positional_embedding_loss_trains_causal_conv():
    student = CausalEncoder(tiny())
    target = torch.nn.Conv1d(16, 16, 5, padding=2, groups=4)     # symmetric, non-causal teacher
    teacher_pos = lambda h: target(h.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    opt = torch.optim.Adam(student.pos_conv.parameters(), lr=3e-2)
    h = torch.randn(4, 40, 16)
    first = None
    for _ in range(60):
        loss = D.positional_embedding_loss(student.positional_embedding, teacher_pos, h)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def _data(n_batches, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, L, generator=g), torch.randint(L // 2, L + 1, (B,), generator=g))
            for _ in range(n_batches)]


def test_distill_loop_reduces_loss():
    torch.manual_seed(0)
    teacher = CausalEncoder(tiny(lookahead=None))
    student = CausalEncoder(tiny(lookahead=1))
    student.load_state_dict(teacher.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    batch = _data(1, 4, 800, 1)[0]
    hist = D.distill(student, teacher, [batch] * 40, opt, weights="reversed_linear",
                     pos_weight=0.1, teacher_pos=teacher.positional_embedding)
    assert len(hist) == 40 and hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_progress_lines(capsys):
    """Progress: a loss line after the first step and a last one (with the known total); the
    time-based lines in between are not asserted. progress=False is silent; bad values raise."""
    torch.manual_seed(0)
    teacher = CausalEncoder(tiny(lookahead=None))
    student = CausalEncoder(tiny(lookahead=1))
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    batches = [torch.randn(2, 400) for _ in range(3)]
    hist = D.distill(student, teacher, batches, opt)
    err = capsys.readouterr().err
    assert "distill: step 1/3  loss" in err
    assert f"distill: finished 3/3  loss {hist[-1]['loss']:.4g}" in err
    D.distill(student, teacher, iter(batches), opt, steps=2, progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress"):
        D.distill(student, teacher, batches, opt, progress=-1)


def test_distill_from_hf_teacher():
    T = pytest.importorskip("transformers")
    cfg = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, conv_dim=(8, 8), conv_kernel=(10, 4),
                           conv_stride=(5, 4), num_conv_pos_embeddings=4,
                           num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                           do_stable_layer_norm=True, hidden_dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                           mask_time_prob=0.0, attn_implementation="eager")
    teacher = T.Wav2Vec2Model(cfg).eval()
    student = CausalEncoder.from_hf(teacher, lookahead=1, pos_conv="causal")
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    hist = D.distill(student, teacher, _data(3, 2, 600, 2), opt, pos_weight=1.0)
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    # the batch's waveform is checked before the transformers teacher runs (it failed inside
    # torch: "expected scalar type Short but found Float", a conv weight's size)
    with pytest.raises(TypeError, match=r"wav must be a floating tensor .*got torch\.int16"):
        D.distill(student, teacher, [torch.zeros(2, 600, dtype=torch.int16)], opt)
    with pytest.raises(ValueError, match=r"wav must have shape \(B, n\) or \(B, 1, n\); got "
                                         r"\(600,\)"):
        D.distill(student, teacher, [torch.randn(600)], opt)
    with pytest.raises(ValueError, match=r"wav must have shape \(B, n\); got \(600,\)"):
        D._check_batch_wav(teacher, torch.randn(600))     # a transformers student


def _ddp_worker(rank, world, path, init_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        teacher, student, (wav, lengths) = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
        B = wav.shape[0] // world
        part = (wav[rank * B:(rank + 1) * B], lengths[rank * B:(rank + 1) * B])
        hist = D.distill(ddp, teacher, [part], opt, weights="reversed_linear")
        if rank == 0:
            torch.save({"grads": {n: p.grad for n, p in student.named_parameters()},
                        "loss": hist[0]["loss"]}, path)
        torch.distributed.barrier()   # both ranks tear down together (gloo aborts otherwise)
    finally:
        torch.distributed.destroy_process_group()
    _subproc.exit_rank()   # success only: skip the finalization abort of gloo threads


def _setup():
    torch.manual_seed(1234)
    teacher = CausalEncoder(tiny(lookahead=None)).double()
    student = CausalEncoder(tiny(lookahead=1)).double()
    g = torch.Generator().manual_seed(99)
    wav = torch.randn(4, 700, generator=g, dtype=torch.float64)
    lengths = torch.tensor([700, 690, 300, 420])   # ranks hold very different valid frame counts
    return teacher, student, (wav, lengths)


def test_ddp_gloo_matches_single_process():
    teacher, student, batch = _setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    hist = D.distill(student, teacher, [batch], opt, weights="reversed_linear")
    ref = {n: p.grad.clone() for n, p in student.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "grads.pt")
        _subproc.spawn(_ddp_worker, args=(2, path, os.path.join(d, "init")), nprocs=2)
        got = torch.load(path)
    assert abs(got["loss"] - hist[0]["loss"]) < 1e-10 * abs(hist[0]["loss"])
    for n, g in ref.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_hidden_state_loss_rejects_lengths_that_would_broadcast():
    """lengths of shape (1,) (or a scalar) would broadcast one slot's length over the batch: a
    silently wrong loss; it is refused, naming the expected shape. Float lengths are refused."""
    s = [torch.randn(3, 5, 4)]
    t = [torch.randn(3, 5, 4)]
    for bad in (torch.tensor([5]), torch.tensor(5), torch.tensor([[5, 5, 5]])):
        with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
            D.hidden_state_loss(s, t, lengths=bad)
    for bad in (torch.tensor([5.0, 4.0, 3.0]), torch.tensor([True, False, True])):
        with pytest.raises(TypeError, match="integers"):
            D.hidden_state_loss(s, t, lengths=bad)
    with pytest.raises(ValueError, match=r"\(B, T, E\)"):
        D.hidden_state_loss([torch.randn(3, 5)], [torch.randn(3, 5)])
    # lists and tensors of the right shape keep working, and agree
    a = D.hidden_state_loss(s, t, lengths=[5, 2, 3])[0]
    b = D.hidden_state_loss(s, t, lengths=torch.tensor([5, 2, 3]))[0]
    assert torch.equal(a, b)


def test_distill_layers_are_validated():
    torch.manual_seed(0)
    teacher = CausalEncoder(tiny(lookahead=None))
    student = CausalEncoder(tiny(lookahead=1))
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    batch = _data(1, 2, 400, 1)[0]
    for layers, match in (([(1, 5)], r"\(1, 5\) is out of range.*teacher 3"),
                          ([(3, 1)], r"\(3, 1\) is out of range"),
                          ([(1,)], "int pairs"), ([(1.0, 1)], "int pairs"), ([], "at least one")):
        with pytest.raises(ValueError, match=match):
            D.distill(student, teacher, [batch], opt, layers=layers, progress=False)
    hist = D.distill(student, teacher, [batch], opt, layers=[(-1, -1), (1, 1)], progress=False)
    assert len(hist) == 1 and len(hist[0]["per_layer"]) == 2


def test_conv_adapter_student_counts_every_valid_frame():
    """A CausalEncoder student with the conv adapter: its hidden states come before the adapter,
    out.lengths counts the frames after its strides (13 of 49 valid frames entered the loss).
    Full lengths give the loss without lengths, and the frame count is the hidden states'."""
    torch.manual_seed(12)
    teacher = CausalEncoder(tiny(lookahead=None))
    student = CausalEncoder(tiny(add_adapter=True, num_adapter_layers=2))
    wav = torch.randn(2, 1600)
    full = torch.tensor([1600, 1600])
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    with_len = D.distill(student, teacher, [(wav, full)], opt, progress=False)[0]
    without = D.distill(student, teacher, [wav], opt, progress=False)[0]
    T = student.frame_lengths(1600)
    assert with_len["frames"] == without["frames"] == 2 * T
    assert abs(with_len["loss"] - without["loss"]) < 1e-6 * max(1.0, abs(without["loss"]))
    hs, frames = D.hidden_states(student, wav, torch.tensor([1600, 900]))
    assert frames.tolist() == [T, student.frame_lengths(900)] and hs[1].shape[1] == T


def test_positional_loss_does_not_read_the_padding():
    """pos_weight > 0: the positional convs see the padded frames as zeros, as the encoders'
    own forwards do, so the loss does not depend on what the padding holds (the teacher's
    symmetric conv read it)."""
    torch.manual_seed(13)
    teacher = CausalEncoder(tiny(lookahead=None))
    target = torch.nn.Conv1d(16, 16, 5, padding=2, groups=4)      # symmetric teacher conv
    teacher_pos = lambda h: target(h.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    student = CausalEncoder(tiny())
    wav, lengths = torch.randn(2, 1600), torch.tensor([1600, 900])
    wav[1, 900:] = 0
    other = wav.clone()
    other[1, 900:] = torch.randn(700)
    losses = []
    for w in (wav, other):
        s = copy.deepcopy(student)
        opt = torch.optim.SGD(s.parameters(), lr=0.0)
        losses.append(D.distill(s, teacher, [(w, lengths)], opt, pos_weight=1.0,
                                teacher_pos=teacher_pos, progress=False)[0]["loss"])
    assert losses[0] == losses[1]


def test_student_sharing_the_teachers_parameters():
    """distill freezes the teacher's parameters: a student made of them had nothing left to train
    (torch's "element 0 of tensors does not require grad"), and one sharing a parameter's storage
    under another Parameter would move the teacher's targets: both refused by name. A student
    sharing a frozen part (its feature extractor) trains the rest."""
    torch.manual_seed(14)
    teacher = CausalEncoder(tiny(lookahead=None))
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    wav = [torch.randn(2, 1600)]
    same = copy.deepcopy(teacher)
    for (_, p), (_, q) in zip(same.named_parameters(), teacher.named_parameters()):
        p.data = q.data                                       # storage only
    with pytest.raises(ValueError, match=r"shares storage with a teacher's"):
        D.distill(same, teacher, wav, opt(same), progress=False)
    alias = CausalEncoder(tiny())
    alias.load_state_dict(teacher.state_dict())
    for name, p in teacher.named_parameters():
        mod, _, leaf = name.rpartition(".")
        setattr(alias.get_submodule(mod) if mod else alias, leaf, p)
    with pytest.raises(ValueError, match=r"every trainable parameter of the student is one of "
                                         r"the teacher's"):
        D.distill(alias, teacher, wav, opt(alias), progress=False)
    # a frozen student parameter sharing a teacher's storage moves nothing: taken; so are
    # zero-size parameters (no storage to compare)
    frozen = copy.deepcopy(teacher)
    frozen.layer_norm.weight.data = teacher.layer_norm.weight.data
    frozen.layer_norm.weight.requires_grad_(False)
    frozen.empty = torch.nn.Linear(4, 0)
    teacher.empty = torch.nn.Linear(4, 0)
    D.distill(frozen, teacher, wav, opt(frozen), progress=False)
    del teacher.empty
    student = CausalEncoder(tiny())
    student.feature_extractor = teacher.feature_extractor     # a shared frozen front end
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    D.distill(student, teacher, wav, opt(student), progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("feature_extractor.") for n in changed)


def test_pos_weight_finds_a_head_teachers_pos_conv_and_refuses_a_dropped_one():
    """pos_weight's default teacher_pos looked at the teacher itself only: a ...ForCTC teacher
    was refused ('has neither ... encoder.pos_conv_embed'); a teacher patched with
    pos_conv='drop' (its conv returns a 0-d zero) failed later on a shape message."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf import make_model
    torch.manual_seed(47)
    base = make_model("w2v2_post").eval()
    head = D._default_teacher_pos
    from transformers import Wav2Vec2ForCTC
    ctc = Wav2Vec2ForCTC(base.config).eval()
    assert head(ctc) is ctc.wav2vec2.encoder.pos_conv_embed
    assert head(base) is base.encoder.pos_conv_embed
    student = CausalEncoder.from_hf(base, lookahead=1, left=5, pos_conv="causal")
    assert head(student) == student.positional_embedding
    dropped = copy.deepcopy(base)
    H.apply_pyencoder_to_wav2vec2(dropped, lookahead_frames=2, pos_conv="drop")
    with pytest.raises(ValueError, match=r"positional conv is dropped by its pyencoder patch"):
        D.distill(student, dropped, [(torch.randn(1, 800), None)],
                  torch.optim.SGD(student.parameters(), lr=1e-3), pos_weight=0.5,
                  progress=False)
    with pytest.raises(ValueError, match="has neither positional_embedding"):
        head(torch.nn.Linear(2, 2))
    # a head teacher trains with the positional loss
    hist = D.distill(student, ctc, [(torch.randn(1, 800), None)],
                     torch.optim.SGD(student.parameters(), lr=1e-3), pos_weight=0.5,
                     progress=False)
    assert len(hist) == 1 and hist[0]["loss"] > 0
