"""Hypothesis strategies for the hostile upstream values the routing and event tests feed in.

Upstream is a third-party server: any field may hold any JSON value, in any case, with
any characters -- including `.`, `*`, `#`, control characters, lone surrogates (JSON
allows `\\ud800` escapes) and strings far past any AMQP limit.
"""

from __future__ import annotations

from hypothesis import strategies as st

# Every code point, surrogates included: json.loads turns "\ud800" escapes into them.
any_char = st.characters(codec=None, exclude_categories=())

# Characters that matter to topic routing, weighted in so they show up often.
routing_chars = st.sampled_from(list(".*#. \t\n\x00\x7fAZaz09_-İK\u212aß\ufeff\U0001f600"))

hostile_text = st.one_of(
    st.text(),
    st.text(any_char, max_size=80),
    st.text(st.one_of(routing_chars, any_char), max_size=80),
    st.text(routing_chars, min_size=60, max_size=300),
    # Huge values: cheap to build, so a test sees many of them.
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(100, 20_000)),
    st.sampled_from(["", "Container", "containter", "CONTAINTER", "container", "Service",
                     "user-notifications", "auth", "a.b#*", "*", "#", ".", "..", "a.b.c"]),
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False, allow_infinity=False), hostile_text,
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(hostile_text, children, max_size=5),
    max_leaves=15,
)

parent_uris = st.one_of(
    st.builds(lambda kind, uid: f"/api/v1/{kind}/{uid}/",
              st.one_of(st.sampled_from(["service", "stack", "node", "nodecluster"]),
                        hostile_text),
              st.one_of(st.uuids().map(str), hostile_text)),
    json_values,
)

# Objects shaped like Tutum events, with every field allowed to be hostile.
event_objects = st.fixed_dictionaries(
    {"type": json_values},
    optional={
        "action": json_values,
        "state": json_values,
        "resource_uri": json_values,
        "parents": st.one_of(st.lists(parent_uris, max_size=8), json_values),
        "uuid": json_values,
        "data": json_values,
    },
)

# Event-shaped objects whose `type` is text other than `auth`: these must be routed.
routable_objects = st.builds(lambda obj, type_: {**obj, "type": type_},
                             event_objects, hostile_text.filter(lambda t: t != "auth"))
