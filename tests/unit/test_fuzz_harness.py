"""The fuzz harness (tests/fuzz/harness.py) over its seed corpus and hypothesis's inputs.

The coverage-guided run with atheris is tests/test_fuzz.py; this is the same check,
in-process and in seconds, and the fallback where atheris cannot be installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.fuzz.harness import classify_target, frames_target
from tests.support.hostile_server import frame_header

SEEDS = Path(__file__).parent.parent / "fuzz" / "corpus"


@pytest.mark.parametrize("seed", sorted((SEEDS / "frames").iterdir()), ids=lambda p: p.name)
def test_frame_seeds(seed):
    frames_target(seed.read_bytes())


@pytest.mark.parametrize("seed", sorted((SEEDS / "classify").iterdir()), ids=lambda p: p.name)
def test_classify_seeds(seed):
    classify_target(seed.read_bytes())


frame_parts = st.tuples(st.sampled_from([0, 1, 2, 8, 9, 10, 3]), st.booleans(),
                        st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.lists(frame_parts, max_size=12), st.binary(max_size=40))
def test_frames_whatever_the_frames(step, parts, tail):
    stream = b"".join(frame_header(op, len(p), fin) + p for op, fin, p in parts)
    frames_target(bytes([step]) + stream + tail)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_frames_whatever_the_bytes(data):
    frames_target(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=500), st.text(max_size=300).map(str.encode)))
def test_classify_whatever_the_payload(payload):
    classify_target(payload)
