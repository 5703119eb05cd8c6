"""Configuration as the deployment files use it: systemd credentials, the health
check's address, and what a plain install brings."""

from __future__ import annotations

import argparse
import re
from importlib import metadata

import pytest

from bridge import config
from bridge.errors import ConfigError


def load(environ):
    return config.load(argparse.Namespace(), environ)


def test_systemd_credentials_are_found_without_the_d_specifier(tmp_path):
    (tmp_path / "tutum-apikey").write_text("key-from-systemd\n")
    (tmp_path / "amqp-password").write_text("pw-from-systemd\n")
    cfg = load({"TUTUM_USER": "alice", "CREDENTIALS_DIRECTORY": str(tmp_path),
                "AMQP_URL": "amqp://bridge@rabbit:5672/%2F", "BRIDGE_STATE_DIR": str(tmp_path)})
    assert "token=key-from-systemd" in cfg.stream.url
    assert cfg.amqp.urls == ("amqp://bridge:pw-from-systemd@rabbit:5672/%2F",)


def test_an_explicit_file_wins_over_the_credentials_directory(tmp_path):
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "tutum-apikey").write_text("from-systemd")
    (tmp_path / "mine").write_text("from-my-file")
    cfg = load({"TUTUM_USER": "alice", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds"),
                "TUTUM_APIKEY_FILE": str(tmp_path / "mine"), "BRIDGE_STATE_DIR": str(tmp_path)})
    assert "token=from-my-file" in cfg.stream.url


def test_the_health_check_finds_the_port_a_port_0_listener_picked(tmp_path):
    env = {"BRIDGE_METRICS_ADDR": "0.0.0.0:0", "BRIDGE_STATE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="port 0"):
        config.probe_address(env)
    config.metrics_address_file(tmp_path / "spool.sqlite3").write_text("0.0.0.0:40123\n")
    assert config.probe_address(env) == ("127.0.0.1", 40123)
    assert config.probe_address({"BRIDGE_METRICS_ADDR": "[::]:9120"}) == ("::1", 9120)
    assert config.probe_address({"BRIDGE_METRICS_ADDR": ""}) is None


def test_a_plain_install_brings_what_bench_needs():
    """`bench` is a verb of the installed command: psutil cannot be a test extra only."""
    requires = metadata.requires("tutum-bridge") or []
    plain = [r for r in requires if "extra ==" not in r]
    assert any(re.match(r"psutil\b", r) for r in plain), plain


def test_the_version_is_declared_once():
    from bridge import __version__
    assert metadata.version("tutum-bridge") == __version__
