"""The trajectory wire format (Redis stream entries, replay items): a round trip keeps every field, the
encoding is byte for byte the one entries already stored were written in, and decoded arrays train right."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.batch import TrainSample
from rollout.types import ToolCall, Trajectory

_text = st.text(max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_tool_calls = st.lists(st.builds(ToolCall, name=_text, arguments=st.dictionaries(_text, _json, max_size=3),
                                 status=st.sampled_from(["ok", "bad_json", "error"]), error=_text, result=_text,
                                 urls=st.lists(_text, max_size=3), turn=st.integers(0, 20)), max_size=4)


@st.composite
def trajectories(draw) -> Trajectory:
    n = draw(st.integers(0, 600))
    ids = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    # float32-exact values, so the list form compares equal after the float32 wire.
    logp = [float(np.float32(x)) for x in draw(st.lists(st.floats(-30, 0, width=32), min_size=n, max_size=n))]
    reward = draw(st.none() | st.floats(-1, 2, allow_nan=False))
    return Trajectory(
        draw(_text), draw(st.integers(0, 64)), ids, mask, logp, draw(st.integers(0, n)),
        tool_calls=draw(_tool_calls), final_text=draw(_text), answer=draw(st.none() | _text),
        finish_reason=draw(st.sampled_from(["answered", "max_tool_calls", "context", "error"])),
        num_turns=draw(st.integers(0, 30)), format_ok=draw(st.booleans()),
        policy_version_start=draw(st.integers(0, 1000)), policy_version_end=draw(st.integers(0, 1000)),
        reward=reward, correct=None if reward is None else draw(st.booleans()),
        labels=draw(st.lists(_text, max_size=4)),
        replayed=draw(st.booleans()), worker=draw(_text), error=draw(_text),
    )


def _asdict_wire_meta(t: Trajectory) -> bytes:
    """The meta encoding as first written (dataclasses.asdict): what entries already in Redis hold."""
    meta = asdict(replace(t, token_ids=[], loss_mask=[], behaviour_logprobs=[]))
    for key in ("token_ids", "loss_mask", "behaviour_logprobs"):
        meta.pop(key)
    return json.dumps(meta, separators=(",", ":")).encode()


@settings(max_examples=60, deadline=None)
@given(trajectories())
def test_round_trip_keeps_every_field_and_decodes_packed(t: Trajectory):
    got = Trajectory.from_wire(t.to_wire())
    assert (got.token_ids.dtype, got.loss_mask.dtype, got.behaviour_logprobs.dtype) == (np.int32, np.uint8, np.float32)
    assert got.token_ids.tolist() == t.token_ids and got.loss_mask.tolist() == t.loss_mask
    assert got.behaviour_logprobs.tolist() == t.behaviour_logprobs
    arrays = dict(token_ids=[], loss_mask=[], behaviour_logprobs=[])
    assert replace(got, **arrays) == replace(t, **arrays)  # every other field, tool calls included
    assert got.generated_tokens == t.generated_tokens


@settings(max_examples=60, deadline=None)
@given(trajectories())
def test_encoding_is_the_stored_format_whatever_the_array_form(t: Trajectory):
    wire = t.to_wire()
    assert wire["meta"] == _asdict_wire_meta(t)
    packed = replace(t).pack()
    assert packed.to_wire() == wire
    assert Trajectory.from_wire(wire).to_wire() == wire  # a decoded entry re-encodes (replay) to the same bytes
    assert Trajectory.from_wire({k.encode(): v for k, v in wire.items()}).to_wire() == wire  # as Redis returns it


@given(st.integers(0, 3000), st.integers(0, 3000))
def test_loss_tokens_of_a_decoded_mask_do_not_wrap(prompt: int, generated: int):
    t = Trajectory("q", 0, [7] * (prompt + generated), [0] * prompt + [1] * generated, [0.0] * (prompt + generated),
                   prompt)
    got = Trajectory.from_wire(t.to_wire())
    sample = TrainSample(got.token_ids, got.loss_mask, got.behaviour_logprobs, 1.0)
    expected = generated - (1 if prompt == 0 and generated > 0 else 0)  # the first token is never predicted
    plain = TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, 1.0)
    assert sample.loss_tokens == plain.loss_tokens == expected
