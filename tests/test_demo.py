"""The demo's machine report and real-time-factor text (no timings, no model)."""
from pyencoder import _demo


def test_busy_warning_only_above_core_count():
    assert _demo.busy_warning(None, 2) is None
    assert _demo.busy_warning(1.9, 2) is None
    assert _demo.busy_warning(2.0, 2) is None
    w = _demo.busy_warning(11.8, 2)
    assert "busy" in w and "11.8" in w and "2 usable cores" in w and "times below" in w
    assert "times above" in _demo.busy_warning(3.0, 2, "above")


def test_rtf_text_says_which_side_of_real_time():
    assert "keeps up" in _demo.rtf_text(0.5) and "faster than real time" in _demo.rtf_text(0.5)
    assert "slower than real time" in _demo.rtf_text(2.2)
    assert "2.200" in _demo.rtf_text(2.2)


def test_machine_line_and_report(capsys, monkeypatch):
    line = _demo.machine_line(0.4, 2, 2, "auto", False)
    assert "torch threads 2" in line and "load average 0.4" in line and "cpu" in line
    assert "n/a" in _demo.machine_line(None, 4, 1, "torch", True)
    monkeypatch.setattr(_demo, "_load", lambda: 9.0)
    monkeypatch.setattr(_demo, "_usable_cores", lambda: 2)
    assert _demo.report_machine("start") is not None
    assert _demo.report_machine("end") is not None
    out = capsys.readouterr().out
    assert "torch threads" in out and "WARNING" in out and "at the end: 9.0" in out
    monkeypatch.setattr(_demo, "_load", lambda: 0.5)
    assert _demo.report_machine("end") is None


def test_streaming_demo_graph_path_logic(capsys):
    """The demo's GPU streaming path (eager warm-up, then the captured step for the full chunks,
    the general step for the last partial one, flush) with an eager stand-in for CudaGraphStep
    on the CPU: the streamed output equals offline, the stand-in ran the steady chunks."""
    import pytest
    import torch
    pytest.importorskip("transformers")

    calls = []

    class EagerGraph:
        def __init__(self, module, state, example):
            module.step_fixed(example.clone(), _copy(state), check=True)   # as the real warm-up
            self.module, self.state = module, state

        def __call__(self, x):
            calls.append(x.shape[1])
            return self.module.step_fixed(x, self.state)

    def _copy(state):
        import copy
        return copy.deepcopy(state)
    model, _ = _demo._build_hf_model(None, 3, 250)
    torch.manual_seed(0)
    audio = torch.randn(1, 1280 * 9 + 640)
    streamed, offline, times, t_flush, _, how = _demo._stream_on(model, audio, 1280, 80, "cpu",
                                                                 graph_step=EagerGraph)
    assert how == "CUDA graph, CPU" and calls == [1280] * 5 and len(times) == 10
    assert t_flush >= 0
    out = capsys.readouterr().out            # the last chunk holds 640 samples: 40 ms of audio
    assert "chunk   10/10" in out and "ms compute for 40 ms of audio" in out
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() <= 1e-4 * offline.abs().max()


def test_streaming_demo_without_transformers_streams_a_native_encoder(monkeypatch, capsys):
    """Without transformers (a plain `pip install pyencoder`) the demo's streaming part was
    skipped; it streams pyencoder.models.CausalEncoder of the same geometry now (shrunk here)."""
    import torch
    from pyencoder.models import CausalEncoder, EncoderConfig
    monkeypatch.setattr(_demo, "_build_hf_model",
                        lambda *a: (None, "transformers is not installed"))
    real = _demo._build_native_model

    def tiny(lookahead_frames, left_frames):
        model, what = real(lookahead_frames, left_frames)
        assert model.config.hidden_size == 768 and model.config.num_layers == 12
        torch.manual_seed(0)
        cfg = EncoderConfig(conv_dim=(16,) * 7, hidden_size=32, num_layers=2, num_heads=2,
                            ffn_dim=48, left=left_frames, lookahead=lookahead_frames,
                            pos_conv="causal", pos_conv_kernel=16, pos_conv_groups=2)
        return CausalEncoder(cfg).eval(), what
    monkeypatch.setattr(_demo, "_build_native_model", tiny)
    diff = _demo.streaming_demo(quick=True)
    out = capsys.readouterr().out
    assert "pyencoder.models.CausalEncoder" in out and "skipped" not in out
    assert "algorithmic latency: 65.0 ms lookahead = 60 ms attention + 5 ms" in out
    assert diff is not None and diff <= 1e-4


def test_demo_checkpoint_must_be_a_local_model_directory(tmp_path):
    """A path that is not a saved model reached transformers, which took it for a Hub id and
    failed ~50 lines of traceback later; refused by name first."""
    import pytest
    from pyencoder.__main__ import main
    for bad in (str(tmp_path / "nope"), str(tmp_path)):
        with pytest.raises(SystemExit, match="demo --checkpoint: .* is not a local Hugging Face "
                                             "model directory"):
            main(["demo", "--checkpoint", bad])


def test_without_transformers_the_hf_paths_say_what_to_install(tmp_path, monkeypatch):
    """`import pyencoder.hf` without transformers failed with a bare "No module named
    'transformers'" from deep in register(); `demo --checkpoint DIR` without it printed "skipped"
    and exited 0 although the user asked for their checkpoint."""
    import sys

    import pytest

    import _subproc
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import pyencoder.hf\nexcept ImportError as e:\n    print('ERR', e)\n")
    r = _subproc.run([sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ERR pyencoder.hf needs transformers>=" in r.stdout and "pyencoder[hf]" in r.stdout
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit, match=r"demo --checkpoint: transformers is not installed"):
        _demo.streaming_demo(quick=True, checkpoint=str(tmp_path))
