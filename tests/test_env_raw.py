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
