"""Frame classification (docs/contract.md section 3): what a worker sees for each frame the stream sends.

`classify` decides, for every frame, between a routable event (key + headers), the
`auth` handshake (not published) and quarantine (with a reason). Headers go on the
wire as an AMQP field table, so beyond their values the tests hold them to what the
broker will take: pika must be able to encode them, and they must fit in RabbitMQ's
default frame (an oversize header frame makes the broker close the connection, and a
bridge that republishes it after reconnecting would be stuck on it for ever).
"""

from __future__ import annotations

import json

import pika.data
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.event import (HEADER_VALUE_MAX, IDENTITY_HEADER, Reason, classify, defer, quarantine,
                          resolve)
from tests.support.json_values import any_char, event_objects, json_values, routable_objects
from tests.support.spec import (QUARANTINE_REASONS, WORD, parsed, quarantine_reasons,
                                spec_type_word, spec_word)

# RabbitMQ's default frame_max; the content header frame (all properties) must fit in it.
FRAME_MAX = 131072
# Room left for the other properties (message_id, timestamp, app_id, x-republished, ...).
HEADERS_MAX = FRAME_MAX - 4096
T = 1_700_000_000.25


def encoded_size(headers: dict) -> int:
    """The headers as pika puts them on the wire; raises if pika cannot encode them."""
    pieces: list[bytes] = []
    return pika.data.encode_table(pieces, headers)


def frame(obj: object, **dumps) -> bytes:
    return json.dumps(obj, **dumps).encode("utf-8", "surrogatepass")


# --- routable events -------------------------------------------------------------------

CONTAINER_EVENT = {
    "type": "container",
    "action": "update",
    "state": "Running",
    "resource_uri": "/api/v1/container/0b8d7f3c-1111-4c5e-9d6e-2f7a5b2d9c01/",
    "parents": [
        "/api/v1/service/aaaa1111-0000-4000-8000-000000000001/",
        "/api/v1/stack/bbbb2222-0000-4000-8000-000000000002/",
        "/api/v1/node/cccc3333-0000-4000-8000-000000000003/",
        "/api/v1/service/dddd4444-0000-4000-8000-000000000004/",
    ],
    "uuid": "0b8d7f3c-1111-4c5e-9d6e-2f7a5b2d9c01",
    "datetime": "Thu, 27 Nov 2014 10:11:12 +0000",
}


def test_container_event_headers_are_exactly_the_promised_ones():
    body = frame(CONTAINER_EVENT)
    event = classify(body, T)
    assert event is not None and not event.quarantined
    assert event.routing_key == "container.update"
    assert event.received_at == T
    assert event.headers == {
        "type": "container",
        "action": "update",
        "state": "Running",
        "resource_uri": CONTAINER_EVENT["resource_uri"],
        "parents": CONTAINER_EVENT["parents"],
        # The first parent of each kind wins: the second service is only in `parents`.
        "parent-service": "aaaa1111-0000-4000-8000-000000000001",
        "parent-stack": "bbbb2222-0000-4000-8000-000000000002",
        "parent-node": "cccc3333-0000-4000-8000-000000000003",
    }
    encoded_size(event.headers)


def test_nodes_of_a_node_cluster_carry_the_cluster_uuid():
    body = frame({"type": "node", "action": "create", "state": "Deploying",
                  "parents": ["/api/v1/nodecluster/nc-1/"]})
    event = classify(body, T)
    assert event.headers["parent-nodecluster"] == "nc-1"
    assert event.headers["parents"] == ["/api/v1/nodecluster/nc-1/"]


def test_absent_state_and_resource_uri_are_absent_headers():
    event = classify(b'{"type": "Service", "action": "Delete"}', T)
    assert event.routing_key == "service.delete"
    assert event.headers["type"] == "service" and event.headers["action"] == "delete"
    assert "state" not in event.headers and "resource_uri" not in event.headers
    assert not any(name.startswith("parent-") for name in event.headers)


@pytest.mark.parametrize("body, key", [
    (b'{"type": "containter", "action": "update"}', "container.update"),
    (b'{"type": "CONTAINER", "action": "Create"}', "container.create"),
    (b'{"type": "user-notifications", "data": [{"type": "user-notification"}]}',
     "user-notifications.none"),
    (b'{"type": "user-notification", "action": ""}', "user-notification.none"),
    (b'{"type": "error", "data": {"errorMessage": "UNAUTHORIZED"}}', "error.none"),
    (b'{"type": "a.b#*", "action": "*.#"}', "a_b__.___"),
    (b'{"type": "stack", "action": null}', "stack.none"),
])
def test_keys_and_type_action_headers_agree(body, key):
    event = classify(body, T)
    assert event.routing_key == key
    assert f"{event.headers['type']}.{event.headers['action']}" == key


def test_body_is_the_frame_exactly_never_reserialised():
    body = ('{ "action" : "update",\n\t"type":"container", "n": 1.0e0, "big": 12345678901234567890,'
            ' "esc": "\\u00e9\\/", "raw": "\u00e9\U0001f600", "data": {"b": 1, "a": 2} }  ').encode()
    event = classify(body, T)
    assert type(event.body) is bytes
    assert event.body == body


@pytest.mark.parametrize("body", [b'{"type": "auth"}',
                                  b'{"type": "auth", "user": "alice", "extra": [1, 2]}'])
def test_auth_frames_are_handshake_not_events(body):
    assert classify(body, T) is None


# --- quarantine ------------------------------------------------------------------------

DEEP = b'{"type": "container", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("body, binary, reason", [
    (b'{"type": "container", "action": "update"}', True, "binary-frame"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", True, "binary-frame"),
    (b'{"type": "container", "action": "upd\x00ate"}', False, "nul-byte"),
    (b'{"type": "container\xff\xfe"}', False, "invalid-utf8"),
    (b'{"type": "\xed\xa0\x80"}', False, "invalid-utf8"),        # a raw UTF-8 surrogate
    (b'{"type": "container", ', False, "invalid-json"),
    (b"", False, "invalid-json"),
    (b"not json at all", False, "invalid-json"),
    (b'{"type": "container", "n": NaN}', False, "invalid-json"),
    (b'{"type": "container", "n": -Infinity}', False, "invalid-json"),
    (b'{"type": "container"} {"type": "service"}', False, "invalid-json"),
    (DEEP, False, "too-deep"),
    (b'{"type": "container", "type": "service"}', False, "duplicate-keys"),
    (b'{"type": "container", "data": {"a": 1, "a": 2}}', False, "duplicate-keys"),
    (b'[{"type": "container"}]', False, "not-an-object"),
    (b'"container"', False, "not-an-object"),
    (b"42", False, "not-an-object"),
    (b"null", False, "not-an-object"),
    (b'{"action": "update"}', False, "missing-type"),
    (b"{}", False, "missing-type"),
    (b'{"type": 1}', False, "type-not-string"),
    (b'{"type": ["container"]}', False, "type-not-string"),
    (b'{"type": {"name": "container"}}', False, "type-not-string"),
    (b'{"type": null}', False, "type-not-string"),
])
def test_each_quarantine_reason(body, binary, reason):
    event = classify(body, T, binary=binary)
    assert event is not None and event.quarantined
    assert event.body == body
    assert event.received_at == T
    headers = event.headers
    assert headers["x-quarantine-reason"] == reason
    assert headers["x-frame-opcode"] == ("binary" if binary else "text")
    assert headers["x-frame-bytes"] == len(body)
    detail = headers["x-quarantine-detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert len(detail) <= HEADER_VALUE_MAX
    assert "x-truncated" not in headers
    encoded_size(headers)


def test_oversize_frames_are_quarantined_cut_with_their_real_size():
    # The stream reader stops reading an oversize frame at the limit and hands on the cut.
    cut = b'{"type": "container", "data": "' + b"x" * 1000
    event = quarantine(cut, T, Reason.OVERSIZE, "frame of 5000000 bytes over 1048576",
                       size=5_000_000)
    assert event.quarantined and event.body == cut
    assert event.headers["x-quarantine-reason"] == "oversize"
    assert event.headers["x-frame-bytes"] == 5_000_000
    assert event.headers["x-truncated"] is True
    encoded_size(event.headers)


# --- header bounds ---------------------------------------------------------------------

def test_long_values_are_bounded_in_headers():
    event = classify(frame({"type": "container", "action": "update", "state": "S" * 100_000,
                            "resource_uri": "/api/v1/container/" + "u" * 100_000 + "/",
                            "parents": [f"/api/v1/service/{i}/" for i in range(10_000)]}), T)
    assert not event.quarantined
    assert len(event.headers["state"]) <= HEADER_VALUE_MAX
    assert event.headers["state"] == "S" * len(event.headers["state"])
    assert len(event.headers["resource_uri"]) <= HEADER_VALUE_MAX
    assert 1 <= len(event.headers["parents"]) <= 64
    assert event.headers["parent-service"] == "0"
    assert encoded_size(event.headers) <= HEADERS_MAX


def test_headers_fit_in_a_frame_even_when_every_parent_is_long_and_of_its_own_kind():
    # 64 kinds x long multi-byte URIs: within BRIDGE_MAX_FRAME_BYTES, so it is an event.
    parents = [f"/api/v1/kind{i}/" + "\U0001f600" * 2000 + "/" for i in range(64)]
    body = frame({"type": "container", "action": "update", "parents": parents,
                  "state": "\U0001f600" * 5000, "resource_uri": "\U0001f600" * 5000},
                 ensure_ascii=False)
    assert len(body) < 1024 * 1024
    event = classify(body, T)
    assert event is not None and not event.quarantined
    size = encoded_size(event.headers)
    assert size <= HEADERS_MAX, f"headers encode to {size} bytes; RabbitMQ takes {FRAME_MAX}"


def test_parent_kinds_become_safe_header_names():
    event = classify(frame({"type": "container", "action": "update",
                            "parents": ["/api/v1/Weird Kind!/u-1/", "/api/v1/" + "k" * 500 + "/u-2/"]}),
                     T)
    names = [n for n in event.headers if n.startswith("parent-")]
    assert names and all(WORD.fullmatch(n[len("parent-"):]) for n in names)


@pytest.mark.parametrize("field", ["state", "resource_uri", "parents", "action", "type"])
def test_escaped_lone_surrogates_still_make_encodable_headers(field):
    # `"\ud800"` is valid JSON text; Python decodes it to a lone surrogate that UTF-8 (and
    # so an AMQP header) cannot carry. The event must still be publishable.
    obj = {"type": "container", "action": "update", "state": "Running",
           "resource_uri": "/api/v1/container/c1/", "parents": ["/api/v1/service/s1/"]}
    obj[field] = ["/api/v1/service/\ud800/"] if field == "parents" else "x\udc00y"
    event = classify(frame(obj), T)
    assert event is not None and not event.quarantined
    encoded_size(event.headers)


# --- any frame at all ------------------------------------------------------------------

frames = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),
    st.tuples(st.text(any_char, max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
              st.just(False)),
    st.tuples(st.builds(frame, json_values, ensure_ascii=st.booleans()), st.booleans()),
    st.tuples(st.builds(frame, event_objects, ensure_ascii=st.booleans()), st.just(False)),
)


def check_any_frame(body: bytes, binary: bool) -> None:
    event = classify(body, T, binary=binary)
    obj = None if binary else parsed(body)
    is_event_object = isinstance(obj, dict) and isinstance(obj.get("type"), str)
    if event is None:
        assert is_event_object and obj["type"] == "auth"
        return
    assert event.body == body
    if event.quarantined:
        assert not is_event_object
        assert event.headers["x-quarantine-reason"] in QUARANTINE_REASONS
        assert event.headers["x-quarantine-reason"] in quarantine_reasons(body, binary)
        assert event.headers["x-frame-bytes"] == len(body)
        assert event.headers["x-frame-opcode"] == ("binary" if binary else "text")
    else:
        assert is_event_object and obj["type"] != "auth"
        words = event.routing_key.split(".")
        assert len(words) == 2 and all(WORD.fullmatch(w) for w in words)
        assert words == [spec_type_word(obj["type"]), spec_word(obj.get("action"))]
        assert [event.headers["type"], event.headers["action"]] == words
        state = obj.get("state")
        if isinstance(state, str) and state.isprintable() and 0 < len(state) <= HEADER_VALUE_MAX:
            assert event.headers["state"] == state
    # Bounded and encodable whatever came in.
    size = encoded_size(event.headers)
    assert size <= HEADERS_MAX, f"headers encode to {size} bytes; RabbitMQ takes {FRAME_MAX}"
    for name in event.headers:
        assert len(name.encode("utf-8", "surrogatepass")) <= 255


@given(frames)
def test_any_frame_is_auth_or_a_routable_event_or_quarantined(case):
    check_any_frame(*case)


@given(routable_objects)
def test_any_json_object_with_a_text_type_is_routed_not_quarantined(obj):
    body = frame(obj)      # ensure_ascii: always valid UTF-8 text
    event = classify(body, T)
    assert event is not None and not event.quarantined, event.headers
    check_any_frame(body, False)


# --- deferred classification (an HA replica's spool) -----------------------------------

def check_deferred_is_classified_on_receipt(body: bytes) -> None:
    """What a replica spools unclassified is published exactly as if classified on
    receipt, identity last; and a handshake is never deferred (it would be spooled)."""
    now = classify(body, T)
    later = defer(body, T)
    if now is None:
        assert later is None, "a handshake must be classified on receipt, to be dropped"
        return
    if later is None:
        return
    later.headers[IDENTITY_HEADER] = "abc-1"
    now.headers[IDENTITY_HEADER] = "abc-1"
    published = resolve(later)
    assert (published.routing_key, published.body, published.received_at, published.quarantined) \
        == (now.routing_key, now.body, now.received_at, now.quarantined)
    assert list(published.headers.items()) == list(now.headers.items())


@given(frames)
def test_a_deferred_frame_is_published_as_if_classified_on_receipt(case):
    body, binary = case
    if not binary:
        check_deferred_is_classified_on_receipt(body)


@pytest.mark.parametrize("body", [
    b'{"type": "auth"}', b'{"type": "\\u0061uth"}', b'{"type": "au\\u0074h", "user": "x"}',
    b'{"type": "container", "action": "update"}', b'{"type": "container", "type": "x"}',
    b'{"type": "container", "n": NaN}', b'{"type": "container\xff"}', b"[]",
])
def test_deferred_frames_of_every_kind(body):
    check_deferred_is_classified_on_receipt(body)


def test_an_event_classified_already_is_resolved_as_it_is():
    event = classify(frame(CONTAINER_EVENT), T)
    assert resolve(event) is event


@given(json_values, st.sampled_from(["", " ", "\n", "\t\r "]), st.sampled_from(["", " ", "\r\n"]),
       st.sampled_from(["", "x", ",", "}", "1", "\u00a0"]))
def test_the_fast_scan_accepts_and_refuses_what_json_does(value, before, after, extra):
    """`_scan` (the common frame without json's Python layers) decodes every text to
    what the decoder gives, and refuses every other with the decoder's own error."""
    from bridge.event import _decoder, _scan
    text = before + json.dumps(value) + after + extra
    try:
        expected = ("ok", _decoder.decode(text))
    except (ValueError, RecursionError) as exc:
        expected = ("error", type(exc), str(exc))
    try:
        got = ("ok", _scan(text))
    except (ValueError, RecursionError) as exc:
        got = ("error", type(exc), str(exc))
    assert repr(got) == repr(expected)
