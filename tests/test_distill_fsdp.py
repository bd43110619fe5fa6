"""pyencoder.distill under FSDP: a 2-process gloo run on CPU of ``distill()`` with the student
wrapped by FSDP2 (``torch.distributed.fsdp.fully_shard``) gives the same loss and the same
gradients (sharded DTensor gradients gathered with ``full_tensor()``) as one process on the
concatenated batch, with ranks holding different numbers of valid frames and the
positional-embedding loss on (float64, 1e-10).

FSDP1 (``FullyShardedDataParallel``) refuses CPU-only machines ("FSDP needs a non-CPU accelerator
device"), so it is covered by a gpu-marked NCCL test that needs at least 2 GPUs.
"""
import os
import tempfile

import pytest
import torch

import _subproc
from pyencoder import distill as D
from test_distill import _setup


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
        return fully_shard
    except ImportError:
        return None


def _kwargs(teacher, kind):
    # FSDP2: with the positional-embedding loss, which calls the student's submodules outside
    # its root forward (verified on CPU); FSDP1: the hidden-state loss only
    if kind == "fsdp1":
        return dict(weights="reversed_linear")
    return dict(weights="reversed_linear", pos_weight=0.1, teacher_pos=teacher.positional_embedding)


def _worker(rank, world, path, init_file, kind):
    torch.set_num_threads(1)
    backend = "nccl" if kind == "fsdp1" else "gloo"
    if kind == "fsdp1":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        teacher, student, (wav, lengths) = _setup()
        if kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            dev = torch.device("cuda", rank)
            teacher, student = teacher.to(dev), student.to(dev)
            wav, lengths = wav.to(dev), lengths.to(dev)
            model = FSDP(student, device_id=rank, use_orig_params=True)
        else:
            fully_shard = _fully_shard()
            for layer in student.layers:
                fully_shard(layer)
            model = fully_shard(student)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        B = wav.shape[0] // world
        part = (wav[rank * B:(rank + 1) * B], lengths[rank * B:(rank + 1) * B])
        hist = D.distill(model, teacher, [part], opt, **_kwargs(teacher, kind))
        if kind == "fsdp1":
            with FSDP.summon_full_params(model, with_grads=True):
                grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().cpu().clone()
                         for n, p in model.named_parameters()}
        else:
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for n, p in student.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "loss": hist[0]["loss"],
                        "sharded": [type(p).__name__ for p in student.parameters()][:1]}, path)
        torch.distributed.barrier()   # both ranks tear down together (gloo aborts otherwise)
    finally:
        torch.distributed.destroy_process_group()
    _subproc.exit_rank()   # success only: skip the finalization abort of gloo threads


def _check(kind):
    teacher, student, batch = _setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    hist = D.distill(student, teacher, [batch], opt, **_kwargs(teacher, kind))
    ref = {n: p.grad.clone() for n, p in student.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "grads.pt")
        _subproc.spawn(_worker, args=(2, path, os.path.join(d, "init"), kind), nprocs=2)
        got = torch.load(path)
    if kind == "fsdp2":
        assert got["sharded"] == ["DTensor"]    # the parameters really were sharded
    assert abs(got["loss"] - hist[0]["loss"]) < 1e-10 * abs(hist[0]["loss"])
    assert set(got["grads"]) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(got["grads"][n].cpu(), g, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.skipif(_fully_shard() is None, reason="torch.distributed.fsdp.fully_shard missing")
def test_fsdp2_gloo_matches_single_process():
    _check("fsdp2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="FSDP1 with NCCL needs 2 GPUs (it refuses CPU-only machines)")
def test_fsdp1_nccl_matches_single_process():
    _check("fsdp1")
