"""Routing keys (docs/contract.md section 3): whatever upstream sends, a key is two safe words.

Workers bind `container.*`, `*.delete`, `service.#`; a key with a third word, a `*`, a
`#` or a byte past 255 would make an event vanish from those bindings or make the
broker close the channel. These tests hold `routing_key` to that for any JSON value.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bridge.routing import routing_key
from tests.support.json_values import hostile_text, json_values
from tests.support.spec import WORD, spec_type_word, spec_word

def assert_safe(key: str) -> None:
    words = key.split(".")
    assert len(words) == 2, key
    for word in words:
        assert WORD.fullmatch(word), (key, word)
    assert len(key.encode("utf-8")) <= 255


@given(json_values, json_values)
@example("a.b#*", "up.date*")
@example("#", "*")
@example("x" * 100_000, "y" * 100_000)
@example("İ" * 64, "K" * 64)          # lowercasing changes their length
@example(None, None)
@example(["container"], {"action": "update"})
def test_any_values_make_a_two_word_key_of_safe_words(type_, action):
    key, type_w, action_w = routing_key(type_, action)
    assert_safe(key)
    assert key == f"{type_w}.{action_w}"


@given(hostile_text, hostile_text)
def test_text_values_follow_the_spec_rules(type_, action):
    key, type_w, action_w = routing_key(type_, action)
    assert (type_w, action_w) == (spec_type_word(type_), spec_word(action))


@pytest.mark.parametrize("type_", ["container", "Container", "CONTAINER", "containter",
                                   "Containter", "CONTAINTER"])
def test_container_in_any_case_and_the_documented_misspelling_route_as_container(type_):
    assert routing_key(type_, "Update")[0] == "container.update"


@pytest.mark.parametrize("type_, action, key", [
    ("service", "create", "service.create"),
    ("node", "DELETE", "node.delete"),
    ("nodecluster", "update", "nodecluster.update"),
    ("action", "update", "action.update"),
    ("stack", "delete", "stack.delete"),
    ("user-notifications", None, "user-notifications.none"),
    ("user-notification", None, "user-notification.none"),
    ("error", None, "error.none"),
    ("error", "", "error.none"),
    ("Some_Type-2", "re-Create_1", "some_type-2.re-create_1"),
])
def test_ordinary_keys(type_, action, key):
    assert routing_key(type_, action)[0] == key


@pytest.mark.parametrize("action", [None, "", 0, False, [], {}, ["update"], 1.5])
def test_missing_empty_or_non_text_action_is_the_word_none(action):
    assert routing_key("container", action)[0] == "container.none"


@pytest.mark.parametrize("type_, action, key", [
    ("a.b#*", "x", "a_b__.x"),
    ("container", "update.#", "container.update__"),
    ("*", "*", "_._"),
    ("#", "#", "_._"),
    (".", ".", "_._"),
    ("con tainer", "up\tdate", "con_tainer.up_date"),
    ("conteneur\u00e9", "cr\u00e9er", "conteneur_.cr_er"),
    ("\U0001f600", "\x00", "_._"),
])
def test_separators_wildcards_and_other_characters_are_neutralised(type_, action, key):
    assert routing_key(type_, action)[0] == key


def test_each_word_is_cut_to_64_characters():
    key, type_w, action_w = routing_key("T" * 1000, "a" * 65)
    assert (type_w, action_w) == ("t" * 64, "a" * 64)
    assert len(key) == 129


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=64),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=64))
def test_safe_words_pass_through_unchanged(type_, action):
    expected_type = "container" if type_ == "containter" else type_
    assert routing_key(type_, action)[0] == f"{expected_type}.{action}"
