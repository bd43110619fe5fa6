"""pyencoder._env.env_raw reads os.environ's raw mapping directly (the launch path reads a dozen
variables per call): it must agree with os.environ.get through every way os.environ changes."""
import os
from unittest import mock

from pyencoder._env import env_flag, env_raw


def test_env_raw_agrees_with_os_environ(monkeypatch):
    name = "PYENCODER_TEST_ENV_RAW"
    monkeypatch.delenv(name, raising=False)
    assert env_raw(name) is None and os.environ.get(name) is None
    for value in ("1", "", " off ", "caf\u00e9", "a=b"):
        os.environ[name] = value
        assert env_raw(name) == os.environ.get(name) == value
    del os.environ[name]
    assert env_raw(name) is None
    monkeypatch.setenv(name, "yes")
    assert env_raw(name) == "yes" and env_flag(name, False) is True
    with mock.patch.dict(os.environ, {name: "0"}):
        assert env_raw(name) == "0" and env_flag(name, True) is False
    assert env_raw(name) == "yes"
    os.environ.pop(name)
    assert env_raw(name) is None and env_flag(name, True) is True
    os.environ.setdefault(name, "on")
    assert env_raw(name) == "on"
    os.environ.update({name: "no"})
    assert env_raw(name) == "no"
    monkeypatch.delenv(name)
    assert env_raw(name) is None


def test_env_snapshot_tracks_every_change(monkeypatch):
    """env_snapshot (the call programs' key over the variables the attention path reads) is equal
    for two reads iff every variable's raw value is the same, unset included."""
    from pyencoder._env import env_snapshot
    a, b = "PYENCODER_TEST_SNAP_A", "PYENCODER_TEST_SNAP_B"
    monkeypatch.delenv(a, raising=False)
    monkeypatch.delenv(b, raising=False)
    names = (a, b)
    seen = {env_snapshot(names)}
    for change in (lambda: monkeypatch.setenv(a, ""), lambda: monkeypatch.setenv(a, "0"),
                   lambda: monkeypatch.setenv(b, "0"), lambda: monkeypatch.setenv(a, "1"),
                   lambda: monkeypatch.delenv(b)):
        change()
        snap = env_snapshot(names)
        assert snap not in seen and snap == env_snapshot(names)
        seen.add(snap)
        assert len(snap) == 2
    with mock.patch.dict(os.environ, {b: "x"}):
        assert env_snapshot(names) not in seen
    assert env_snapshot(names) in seen
