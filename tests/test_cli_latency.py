"""`python -m pyencoder latency`: every option has help, the sample rate is honoured, bad values
are argparse errors naming the option (exit 2, no traceback)."""
import pytest

pytest.importorskip("transformers")

from pyencoder.__main__ import main  # noqa: E402


def _run(capsys, *argv):
    rc = main(["latency", *argv])
    return rc, capsys.readouterr().out


def test_default_is_the_readme_line(capsys):
    rc, out = _run(capsys)
    assert rc == 0
    assert "total lookahead:     1040 samples = 65.0 ms at 16000 Hz" in out


def test_sample_rate_is_honoured(capsys):
    rc, out = _run(capsys, "--sample-rate", "8000")
    assert rc == 0
    assert "1040 samples = 130.0 ms at 8000 Hz" in out and "16000" not in out


def test_per_layer_list_and_all(capsys):
    rc, out = _run(capsys, "--layers", "3", "--lookahead-layers", "1,0,2")
    assert rc == 0 and "[1, 0, 2]" in out and "3 frames x 320 samples = 60.0 ms" in out
    rc, out = _run(capsys, "--layers", "2", "--lookahead-frames", "1", "--lookahead-layers", "all")
    assert rc == 0 and "2 frames x 320 samples = 40.0 ms" in out


@pytest.mark.parametrize("argv, option", [
    (["--lookahead-layers", "bogus"], "--lookahead-layers"),
    (["--lookahead-layers", "1,-1"], "--lookahead-layers"),
    (["--layers", "0"], "--layers"),
    (["--layers", "x"], "--layers"),
    (["--lookahead-frames", "-1"], "--lookahead-frames"),
    (["--sample-rate", "0"], "--sample-rate"),
    (["--layers", "3", "--lookahead-layers", "1,1"], "--lookahead-layers"),
    # a list gives each layer's lookahead: an explicit --lookahead-frames was ignored
    (["--layers", "2", "--lookahead-layers", "0,0", "--lookahead-frames", "5"],
     "--lookahead-frames"),
])
def test_bad_values_are_argparse_errors(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        main(["latency", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


def test_every_option_has_help():
    from pyencoder.__main__ import build_parser
    _, subs = build_parser()
    opts = [a for a in subs["latency"]._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in opts} == {"lookahead_frames", "lookahead_layers", "layers",
                                      "sample_rate"}
    for a in opts:
        assert a.help and len(a.help) > 10, a.option_strings
