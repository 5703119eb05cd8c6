"""Which proxy the stream goes through, and the CONNECT exchange (bridge/proxy.py),
without sockets; the stream through a real proxy is tests/test_stream_proxy.py."""

from __future__ import annotations

import pytest

from bridge import config, proxy
from bridge.errors import ConfigError
from tests.unit.test_config import parse

STREAM = "wss://stream.tutum.co/v1/events"


@pytest.mark.parametrize("url, environ, expected", [
    (STREAM, {"https_proxy": "http://p:3128"}, ("p", 3128)),
    (STREAM, {"HTTPS_PROXY": "p:8080"}, ("p", 8080)),                 # no scheme: http
    (STREAM, {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, ("low", 1)),
    (STREAM, {"http_proxy": "http://p:3128"}, None),                  # wss uses https_proxy
    ("ws://sim:8080/v1/events", {"http_proxy": "http://p"}, ("p", 80)),
    ("ws://sim:8080/v1/events", {"https_proxy": "http://p:1"}, None),
    (STREAM, {}, None),
    (STREAM, {"https_proxy": ""}, None),
])
def test_the_proxy_follows_the_streams_scheme_as_curl_does(url, environ, expected):
    chosen = proxy.choose(url, environ)
    assert (chosen and (chosen.host, chosen.port)) == expected


@pytest.mark.parametrize("no_proxy, bypassed", [
    ("*", True),
    ("tutum.co", True), (".tutum.co", True), ("*.tutum.co", True),
    ("stream.tutum.co", True), ("STREAM.Tutum.Co", True),
    ("other.tutum.co", False), ("utum.co", False),
    ("stream.tutum.co:443", True), ("stream.tutum.co:8443", False),
    ("localhost, tutum.co", True), (" , ", False), ("", False),
])
def test_no_proxy_names_hosts_and_their_subdomains(no_proxy, bypassed):
    environ = {"https_proxy": "http://p:3128", "no_proxy": no_proxy}
    assert (proxy.choose(STREAM, environ) is None) == bypassed


@pytest.mark.parametrize("host, no_proxy, bypassed", [
    ("10.1.2.3", "10.0.0.0/8", True), ("11.1.2.3", "10.0.0.0/8", False),
    ("127.0.0.1", "127.0.0.1", True), ("::1", "::1", True), ("::1", "[::1]:443", True),
    ("::1", "[::1]:80", False), ("fd00::5", "fd00::/8", True), ("name", "10.0.0.0/8", False),
])
def test_no_proxy_takes_addresses_and_networks(host, no_proxy, bypassed):
    assert proxy.bypassed(host, 443, no_proxy) == bypassed


def test_credentials_become_basic_auth_and_are_named_as_secrets():
    chosen = proxy.parse_proxy_url("https_proxy", "http://us%40er:p%3Ass@p.corp:3128")
    assert chosen.authorization == "Basic dXNAZXI6cDpzcw=="     # "us@er:p:ss"
    assert set(chosen.secrets) == {"dXNAZXI6cDpzcw==", "p:ss"}
    assert chosen.redacted == "http://us%40er:***@p.corp:3128"
    assert "p:ss" not in repr(chosen) and "dXNA" not in repr(chosen)
    assert proxy.parse_proxy_url("x", "p.corp").secrets == ()


@pytest.mark.parametrize("value, words", [
    ("socks5://p:1080", "socks5:// proxies are not supported"),
    ("https://p:3128", "https:// proxies are not supported"),
    ("http://p:port", "not a proxy URL"),
    ("http://:3128", "names no host"),
])
def test_a_proxy_url_the_bridge_cannot_use_is_a_config_error(value, words):
    with pytest.raises(proxy.ProxyConfigError, match=words):
        proxy.parse_proxy_url("https_proxy", value)


def test_connect_request_names_the_stream_and_carries_the_credentials():
    via = proxy.parse_proxy_url("https_proxy", "http://u:pw@p:1")
    assert proxy.connect_request("stream.tutum.co", 443, via) == (
        b"CONNECT stream.tutum.co:443 HTTP/1.1\r\nHost: stream.tutum.co:443\r\n"
        b"Proxy-Authorization: Basic dTpwdw==\r\n\r\n")
    assert proxy.connect_request("::1", 443, proxy.parse_proxy_url("x", "p")).startswith(
        b"CONNECT [::1]:443 HTTP/1.1\r\n")


def test_the_reply_is_measured_as_it_arrives_and_nothing_after_it_is_taken():
    reply = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 p\r\n\r\n"
    for cut in range(len(reply)):
        assert proxy.reply_length(reply[:cut]) is None
    assert proxy.reply_length(reply + b"\x16\x03") == len(reply)
    proxy.parse_reply(reply)
    proxy.parse_reply(b"HTTP/1.0 200 OK\r\n\r\n")


@pytest.mark.parametrize("head, words", [
    (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
     "refused CONNECT: HTTP 407 Proxy Authentication Required"),
    (b"HTTP/1.1 403\r\n\r\n", "refused CONNECT: HTTP 403$"),
    (b"HTTP/1.1 502 Bad\x1b[31m Gateway\r\n\r\n", r"HTTP 502 Bad\?\[31m Gateway"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "not HTTP"),
])
def test_any_other_reply_is_refused_in_printable_words(head, words):
    with pytest.raises(proxy.ProxyRefused, match=words):
        proxy.parse_reply(head)


def test_a_reply_without_an_end_is_refused_once_it_passes_the_bound():
    assert proxy.reply_length(b"x" * proxy.REPLY_MAX) is None
    with pytest.raises(proxy.ProxyRefused, match="no end"):
        proxy.reply_length(b"x" * (proxy.REPLY_MAX + 1))


def test_the_config_carries_the_proxy_and_hides_its_password(tmp_path):
    environ = {"TUTUM_USER": "alice", "TUTUM_APIKEY": "key", "HOME": str(tmp_path),
               "XDG_STATE_HOME": str(tmp_path), "HTTPS_PROXY": "http://u:ProxyPw-9@p:3128",
               "NO_PROXY": "rabbit.internal"}
    cfg = config.load(parse(), environ)
    assert (cfg.stream.proxy.host, cfg.stream.proxy.port) == ("p", 3128)
    assert "ProxyPw-9" in cfg.secrets and "ProxyPw-9" not in repr(cfg)
    environ["HTTPS_PROXY"] = "socks5://u:ProxyPw-9@p:1080"
    with pytest.raises(ConfigError) as error:
        config.load(parse(), environ)
    assert "HTTPS_PROXY" in str(error.value) and "ProxyPw-9" not in str(error.value)




def test_verbs_whose_stream_is_a_local_simulator_give_their_bridge_no_proxy(monkeypatch):
    """A proxy in the user's shell is for the outside world; `demo` and `bench` run
    their own simulator on 127.0.0.1 (and so does the testing kit)."""
    for name in proxy.VARIABLES:
        monkeypatch.setenv(name, "http://corp-proxy:3128")
    assert not set(proxy.VARIABLES) & set(config.child_environment(config.BRIDGE_ENVIRONMENT))
