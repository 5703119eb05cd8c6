"""The history settings and the client-side pattern filter (docs/contract.md section 8)."""

from datetime import datetime, timezone

import pytest

from bridge.config import parse_retention
from bridge.tools.history import matches, parse_since


@pytest.mark.parametrize("text, max_age", [("7d", "7D"), ("12h", "12h"), ("30m", "30m"),
                                           ("off", None), ("", None), ("90s", "90s")])
def test_retention_becomes_rabbitmqs_max_age(text, max_age):
    assert parse_retention(text) == max_age


@pytest.mark.parametrize("text", ["7", "0d", "1w", "-1h", "seven days"])
def test_a_bad_retention_says_what_is_expected(text):
    with pytest.raises(ValueError, match="7d, 12h"):
        parse_retention(text)


def test_since_is_a_stream_offset():
    assert parse_since("first") == "first" and parse_since("1234") == 1234
    assert parse_since("2h", now=7200.0 + 60) == datetime.fromtimestamp(60, timezone.utc)
    with pytest.raises(ValueError):
        parse_since("yesterday")


@pytest.mark.parametrize("pattern, key, expected", [
    ("#", "container.update", True), ("*.*", "bridge.connected", True),
    ("container.*", "container.update", True), ("container.*", "service.update", False),
    ("*.delete", "node.delete", True), ("service.#", "service", True),
    ("#.update", "container.update", True), ("container", "container.update", False)])
def test_patterns_match_as_a_topic_exchange_does(pattern, key, expected):
    assert matches(pattern, key) is expected
