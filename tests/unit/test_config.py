"""Configuration (docs/contract.md section 5): names, defaults, precedence, and errors that never leak a secret.

An operator sets variables in a compose file or a unit, sometimes overrides one with a
flag, and gets it wrong now and then: the bridge must say which setting is wrong in one
line, without printing the API key or the broker password into a log aggregator.
"""

from __future__ import annotations

import argparse
from urllib.parse import parse_qs, quote, urlsplit

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import config
from bridge.errors import ConfigError

APIKEY = "ApiKeySecret-7f3a9c"
AMQP_PW = "AmqpPwSecret-41b2e8"
AUTH = "ApiKey alice:AuthSecret-c0ffee"
SECRETS = (APIKEY, AMQP_PW, AUTH, "AuthSecret-c0ffee")


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.ALL_RUN_SETTINGS)
    return parser.parse_args(list(flags))


@pytest.fixture
def env(tmp_path):
    """A minimal valid environment, with distinctive secrets to look for."""
    return {"TUTUM_USER": "alice", "TUTUM_APIKEY": APIKEY,
            "AMQP_URL": f"amqp://bridge:{AMQP_PW}@rabbit.example:5672/%2F",
            "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path)}


def load(env, *flags: str) -> config.Config:
    return config.load(parse(*flags), env)


def config_error(env, *flags: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, *flags)
    message = str(info.value)
    assert message and "\n" not in message
    for secret in SECRETS:
        assert secret not in message
    return message


# --- defaults and precedence -----------------------------------------------------------

def test_defaults(tmp_path):
    cfg = load({"TUTUM_USER": "alice", "TUTUM_APIKEY": APIKEY,
                "XDG_STATE_HOME": str(tmp_path / "state")})
    stream = urlsplit(cfg.stream.url)
    assert (stream.scheme, stream.netloc, stream.path) == ("wss", "stream.tutum.co", "/v1/events")
    assert parse_qs(stream.query) == {"token": [APIKEY], "user": ["alice"]}
    assert cfg.amqp.urls == ("amqp://guest:guest@localhost:5672/%2F",)
    assert cfg.amqp.exchange == "tutum.events"
    assert cfg.unrouted == "tutum.unrouted"
    assert cfg.quarantine == "tutum.invalid"
    assert cfg.queue_type == "classic"
    assert cfg.metrics_addr == ("127.0.0.1", 9120)
    assert (cfg.log_level, cfg.log_format) == ("info", "json")
    assert cfg.stream.max_frame_bytes == 1024 * 1024
    assert (cfg.stream.ping_interval, cfg.stream.ping_timeout) == (5.0, 5.0)
    assert cfg.stream.retry_unauthorized is False
    assert cfg.spool_sync == "normal"
    assert cfg.spool_path.is_relative_to(tmp_path / "state")


@pytest.mark.parametrize("variable, flag, env_value, flag_value, read", [
    ("BRIDGE_EXCHANGE", "--exchange", "from-env", "from-flag", lambda c: c.amqp.exchange),
    ("TUTUM_STREAM_HOST", "--stream-host", "ws://env-host:1", "ws://flag-host:2",
     lambda c: urlsplit(c.stream.url).netloc),
    ("LOG_LEVEL", "--log-level", "error", "debug", lambda c: c.log_level),
    ("LOG_FORMAT", "--log-format", "json", "console", lambda c: c.log_format),
    ("BRIDGE_INFLIGHT", "--inflight", "7", "9", lambda c: c.inflight),
    ("BRIDGE_QUARANTINE", "--quarantine", "q-env", "q-flag", lambda c: c.quarantine),
    ("BRIDGE_UNROUTED", "--unrouted", "u-env", "u-flag", lambda c: c.unrouted),
    ("BRIDGE_QUEUE_TYPE", "--queue-type", "quorum", "classic", lambda c: c.topology.queue_type),
    ("AMQP_URL", "--amqp-url", "amqp://env-host/", "amqp://flag-host/",
     lambda c: urlsplit(c.amqp.urls[0]).hostname),
    ("TUTUM_USER", "--user", "env-user", "flag-user",
     lambda c: parse_qs(urlsplit(c.stream.url).query)["user"][0]),
])
def test_a_flag_beats_its_variable_and_the_variable_beats_the_default(
        env, variable, flag, env_value, flag_value, read):
    env[variable] = env_value
    from_env = read(load(env))
    from_flag = read(load(env, flag, flag_value))
    assert str(from_env) in env_value and str(from_flag) in flag_value
    assert from_env != from_flag


def test_empty_metrics_address_turns_metrics_off(env):
    env["BRIDGE_METRICS_ADDR"] = ""
    assert load(env).metrics_addr is None
    assert load({**env, "BRIDGE_METRICS_ADDR": "0.0.0.0:9999"}, "--metrics-addr", "").metrics_addr is None


def test_metrics_address(env):
    env["BRIDGE_METRICS_ADDR"] = "0.0.0.0:19120"
    assert load(env).metrics_addr == ("0.0.0.0", 19120)


def test_stream_url_overrides_the_host_and_keeps_its_query(env):
    env["TUTUM_STREAM_HOST"] = "ws://ignored:1"
    env["TUTUM_STREAM_URL"] = "ws://127.0.0.1:8765/custom/events?region=eu"
    parts = urlsplit(load(env).stream.url)
    assert (parts.netloc, parts.path) == ("127.0.0.1:8765", "/custom/events")
    assert parse_qs(parts.query) == {"region": ["eu"], "token": [APIKEY], "user": ["alice"]}


def test_stream_host_with_a_trailing_slash(env):
    env["TUTUM_STREAM_HOST"] = "wss://stream.example.com/"
    assert urlsplit(load(env).stream.url).path == "/v1/events"


def test_credentials_with_url_special_characters_reach_the_server_intact(env):
    env["TUTUM_USER"], env["TUTUM_APIKEY"] = "al ice+1", "k&y=1+2/3%?#"
    query = parse_qs(urlsplit(load(env).stream.url).query)
    assert query == {"token": ["k&y=1+2/3%?#"], "user": ["al ice+1"]}


def test_a_list_of_broker_urls_for_a_cluster(env):
    env["AMQP_URL"] = "amqp://u:p@rabbit-1:5672/%2F, amqp://u:p@rabbit-2:5672/%2F"
    assert [urlsplit(u).hostname for u in load(env).amqp.urls] == ["rabbit-1", "rabbit-2"]


# --- credentials -----------------------------------------------------------------------

def test_missing_credentials_name_the_missing_variable(env):
    del env["TUTUM_USER"], env["TUTUM_APIKEY"]
    assert "TUTUM_USER" in config_error(env)
    assert "TUTUM_APIKEY" in config_error({**env, "TUTUM_USER": "alice"})
    assert "TUTUM_USER" in config_error({**env, "TUTUM_APIKEY": APIKEY})


def test_tutum_auth_goes_verbatim_in_a_header_not_the_url(env):
    del env["TUTUM_USER"], env["TUTUM_APIKEY"]
    cfg = load({**env, "TUTUM_AUTH": AUTH})
    assert cfg.stream.headers == (f"Authorization: {AUTH}",)
    assert "token" not in urlsplit(cfg.stream.url).query
    assert AUTH in cfg.secrets


def test_apikey_file(env, tmp_path):
    del env["TUTUM_APIKEY"]
    key_file = tmp_path / "apikey"
    key_file.write_text(APIKEY + "\n")
    cfg = load({**env, "TUTUM_APIKEY_FILE": str(key_file)})
    assert parse_qs(urlsplit(cfg.stream.url).query)["token"] == [APIKEY]
    assert APIKEY in cfg.secrets
    assert parse_qs(urlsplit(load(env, "--apikey-file", str(key_file)).stream.url).query)[
        "token"] == [APIKEY]


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_missing_or_empty_apikey_file(env, tmp_path, content):
    del env["TUTUM_APIKEY"]
    key_file = tmp_path / "apikey"
    if content is not None:
        key_file.write_text(content)
    assert "TUTUM_APIKEY" in config_error({**env, "TUTUM_APIKEY_FILE": str(key_file)})


@pytest.mark.parametrize("password", [AMQP_PW, "p@ss:w/rd%41 ?#&=+"])
def test_amqp_password_file_replaces_the_password_in_the_url(env, tmp_path, password):
    pw_file = tmp_path / "amqp-password"
    pw_file.write_text(password + "\n")
    env["AMQP_URL"] = "amqp://bridge:old-password@rabbit.example:5672/prod"
    cfg = load({**env, "AMQP_PASSWORD_FILE": str(pw_file)})
    (url,) = cfg.amqp.urls
    assert "old-password" not in url
    params = pika.URLParameters(url)
    assert (params.credentials.username, params.credentials.password) == ("bridge", password)
    assert (params.host, params.port, params.virtual_host) == ("rabbit.example", 5672, "prod")
    assert password in cfg.secrets


def test_rotated_secret_files_are_read_again_at_each_connection(env, tmp_path):
    """A Kubernetes Secret or systemd credential rotated while the bridge runs: each
    side asks for its URL at connect time and gets the file as it is then; a file
    missing mid-rotation keeps the last good value on the stream side, and is an error
    the publisher reports (and keeps its last URLs)."""
    del env["TUTUM_APIKEY"]
    key_file, pw_file = tmp_path / "apikey", tmp_path / "amqp-password"
    key_file.write_text("key-one\n")
    pw_file.write_text("pw-one\n")
    cfg = load({**env, "TUTUM_APIKEY_FILE": str(key_file), "AMQP_PASSWORD_FILE": str(pw_file)})
    key_file.write_text("key-two\n")
    pw_file.write_text("pw-two\n")

    url, secrets = cfg.stream.current_url()
    assert parse_qs(urlsplit(url).query) == {"token": ["key-two"], "user": ["alice"]}
    assert secrets == ("key-two",)
    (amqp_url,), secrets = cfg.amqp.current_urls()
    assert pika.URLParameters(amqp_url).credentials.password == "pw-two"
    assert secrets == ("pw-two",)

    key_file.unlink()
    pw_file.unlink()
    assert parse_qs(urlsplit(cfg.stream.current_url()[0]).query)["token"] == ["key-one"]
    with pytest.raises(ConfigError):
        cfg.amqp.current_urls()


def test_missing_amqp_password_file_is_a_line_that_reads(env, tmp_path):
    missing = tmp_path / "nope"
    assert config_error({**env, "AMQP_PASSWORD_FILE": str(missing)}) == \
        f"AMQP_PASSWORD_FILE: '{missing}' is not a file"


def test_secrets_stay_out_of_the_config_repr(env):
    cfg = load({**env, "TUTUM_AUTH": AUTH})
    for secret in SECRETS:
        assert secret not in repr(cfg)
        assert secret not in repr(cfg.stream) and secret not in repr(cfg.amqp)


# --- bad values ------------------------------------------------------------------------

@pytest.mark.parametrize("variable, value", [
    ("TUTUM_STREAM_HOST", "http://x"),
    ("TUTUM_STREAM_HOST", "stream.tutum.co"),
    ("TUTUM_STREAM_URL", "https://stream.tutum.co/v1/events"),
    ("AMQP_URL", "foo"),
    ("AMQP_URL", "http://rabbit:5672/"),
    ("AMQP_URL", "amqp://rabbit:notaport/"),
    ("AMQP_URL", " , "),
    ("BRIDGE_EXCHANGE", "amq.topic"),
    ("BRIDGE_EXCHANGE", "x" * 256),
    ("BRIDGE_INFLIGHT", "abc"),
    ("BRIDGE_INFLIGHT", "0"),
    ("BRIDGE_INFLIGHT", "-5"),
    ("BRIDGE_SPOOL_MAX_BYTES", "lots"),
    ("BRIDGE_SPOOL_MAX_BYTES", "0"),
    ("BRIDGE_SPOOL_SYNC", "sometimes"),
    ("BRIDGE_QUEUE_TYPE", "stream"),
    ("BRIDGE_AMQP_HEARTBEAT", "0"),
    ("BRIDGE_AMQP_HEARTBEAT", "61"),
    ("BRIDGE_CONFIRM_TIMEOUT", "never"),
    ("BRIDGE_MAX_FRAME_BYTES", "1XB"),
    ("BRIDGE_PING_INTERVAL", "-1"),
    ("BRIDGE_PING_TIMEOUT", "soon"),
    ("BRIDGE_RECONNECT_MAX", "0"),
    ("BRIDGE_SHUTDOWN_TIMEOUT", "nan"),
    ("BRIDGE_METRICS_ADDR", "nope"),
    ("BRIDGE_METRICS_ADDR", "127.0.0.1:99999"),
    ("BRIDGE_RETRY_UNAUTHORIZED", "maybe"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_FORMAT", "xml"),
    ("TUTUM_CA_FILE", "/nonexistent/ca.pem"),
    ("AMQP_CA_FILE", "/nonexistent/ca.pem"),
])
def test_a_bad_value_is_one_line_naming_the_variable(env, variable, value):
    assert variable in config_error({**env, variable: value})


@pytest.mark.parametrize("flag, value", [("--inflight", "abc"), ("--log-level", "loud"),
                                         ("--stream-host", "ftp://x"), ("--amqp-url", "foo")])
def test_a_bad_flag_is_one_line_naming_the_flag(env, flag, value):
    assert flag in config_error(env, flag, value)


@pytest.mark.parametrize("variable, value, secret", [
    # A forgotten scheme: urlsplit reads "admin" as the scheme and the rest as a path.
    ("AMQP_URL", f"admin:{AMQP_PW}@rabbit.example:5672/%2F", AMQP_PW),
    ("AMQP_URL", f"amqp://admin:{AMQP_PW}@rabbit.example:notaport/", AMQP_PW),
    ("AMQP_URL", f"amqp://admin:{AMQP_PW}@rabbit-1:5672/,rabbit-2", AMQP_PW),
    ("AMQP_URL", f"http://admin:{AMQP_PW}@rabbit.example/", AMQP_PW),
    # The documented query form, pasted with the wrong scheme.
    ("TUTUM_STREAM_URL", f"https://stream.tutum.co/v1/events?token={APIKEY}&user=alice", APIKEY),
    ("TUTUM_STREAM_URL", f"stream.tutum.co/v1/events?token={APIKEY}&user=alice", APIKEY),
    ("TUTUM_STREAM_HOST", f"http://alice:{APIKEY}@stream.tutum.co", APIKEY),
])
def test_a_bad_url_holding_a_secret_does_not_print_it(env, variable, value, secret):
    message = config_error({**env, variable: value})
    assert variable in message
    assert secret not in message


# --- redact_url ------------------------------------------------------------------------

@pytest.mark.parametrize("url, secret, kept", [
    ("amqp://bridge:s3cretPW@rabbit:5672/%2F", "s3cretPW", ["bridge", "rabbit:5672", "/%2F"]),
    ("amqps://bridge:p%40ss%2Fw0rd@rabbit/", "p%40ss", ["bridge", "rabbit"]),
    ("amqp://bridge:p@ss@rabbit/", "p@ss", ["rabbit"]),
    ("wss://stream.tutum.co/v1/events?token=tok3nVALUE&user=alice", "tok3nVALUE",
     ["stream.tutum.co/v1/events", "user=alice", "token="]),
    ("ws://127.0.0.1:9/v1/events?user=alice&token=tok3nVALUE", "tok3nVALUE", ["token="]),
    ("ws://h/v1/events?apikey=tok3nVALUE", "tok3nVALUE", ["apikey="]),
    ("ws://h/v1/events?TOKEN=tok3nVALUE", "tok3nVALUE", []),
    ("ws://alice:tok3nVALUE@h/v1/events", "tok3nVALUE", ["alice", "h/v1/events"]),
])
def test_redact_url_hides_passwords_and_tokens(url, secret, kept):
    redacted = config.redact_url(url)
    assert secret not in redacted
    for part in kept:
        assert part in redacted


def test_redact_url_leaves_a_url_without_secrets_readable():
    assert config.redact_url("amqp://rabbit:5672/%2F") == "amqp://rabbit:5672/%2F"
    assert config.redact_url("wss://stream.tutum.co/v1/events") == "wss://stream.tutum.co/v1/events"


@given(st.text(min_size=1, max_size=40))
def test_redact_url_hides_any_password(tail):
    password = "Zq9" + tail
    url = f"amqp://bridge:{quote(password, safe='')}@rabbit:5672/%2F"
    redacted = config.redact_url(url)
    assert "Zq9" not in redacted
    token_url = f"wss://h/v1/events?token={quote(password, safe='')}&user=alice"
    assert "Zq9" not in config.redact_url(token_url)


# --- high availability -----------------------------------------------------------------

def test_ha_is_off_by_default_and_on_takes_its_tunables(env):
    assert load(env).ha is None
    ha = load({**env, "BRIDGE_HA": "on", "BRIDGE_HA_HEARTBEAT": "4"}).ha
    assert (ha.heartbeat, ha.fill_grace, ha.publish_timeout) == (4, 1.0, 8.0)
    default = load({**env, "BRIDGE_HA": "on"}).ha
    assert (default.heartbeat, default.publish_timeout) == (2, 4.0)
    assert load({**env, "BRIDGE_HA": "on", "BRIDGE_HA_PUBLISH_TIMEOUT": "2.5"}).ha \
        .publish_timeout == 2.5
    assert "BRIDGE_HA_PUBLISH_TIMEOUT" in config_error({**env, "BRIDGE_HA_PUBLISH_TIMEOUT": "0"})
    assert "BRIDGE_HA_HEARTBEAT" in config_error({**env, "BRIDGE_HA_HEARTBEAT": "1.5"})
    assert "BRIDGE_HA" in config_error({**env, "BRIDGE_HA": "sometimes"})
    assert "BRIDGE_HA_FILL_GRACE" in config_error({**env, "BRIDGE_HA_FILL_GRACE": "0"})
