"""The trajectory and group wire formats (Redis stream entries, replay items): a round trip keeps every field, the
encoding is byte for byte the one entries already stored were written in, and decoded arrays train right."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.batch import TrainSample
from learner.group_stream import decode_group, encode_group
from learner.groups import ScoredGroup
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


def _legacy_entry(group: ScoredGroup) -> dict[bytes, bytes]:
    """A stream entry as first written (one field per member and array), which a resumed run may still read."""
    fields = {b"qid": group.question_id.encode(), b"n": str(len(group.members)).encode(),
              b"gid": group.group_id.encode(), b"epoch": str(group.epoch).encode(),
              b"generate_s": repr(group.generate_s).encode(), b"reward_s": repr(group.reward_s).encode()}
    for i, member in enumerate(group.members):
        for key, value in member.to_wire().items():
            fields[f"{i}:{key}".encode()] = value
    return fields


@settings(max_examples=40, deadline=None)
@given(st.lists(trajectories(), max_size=5), _text, st.integers(0, 50), st.floats(0, 1e4), st.floats(0, 1e4))
def test_a_group_entry_round_trips_in_the_new_and_the_first_format(members, gid, epoch, gen_s, rew_s):
    group = ScoredGroup("q", members, gid, epoch, generate_s=gen_s, reward_s=rew_s)
    entry = encode_group(group)
    assert len(entry) == 11  # not one field per member
    for got in (decode_group(entry), decode_group(_legacy_entry(group))):
        assert (got.question_id, got.group_id, got.epoch, got.generate_s, got.reward_s) == ("q", gid, epoch, gen_s,
                                                                                          rew_s)
        assert [m.to_wire() for m in got.members] == [m.to_wire() for m in members]
        for a, b in zip(got.members, members):
            assert a.token_ids.tolist() == b.token_ids and a.loss_mask.tolist() == b.loss_mask
            assert a.behaviour_logprobs.tolist() == b.behaviour_logprobs
    assert encode_group(decode_group(entry)) == entry  # re-encodes to the same entry


def test_members_arrays_of_unequal_lengths_keep_their_own_lengths():
    odd = Trajectory("q", 0, [1, 2, 3], [1], [-0.5, -0.25], 0)  # invalid, but carried as it is
    got = decode_group(encode_group(ScoredGroup("q", [odd, Trajectory("q", 1, [9], [1], [-1.0], 0)])))
    assert [m.token_ids.tolist() for m in got.members] == [[1, 2, 3], [9]]
    assert [m.loss_mask.tolist() for m in got.members] == [[1], [1]]
    assert [m.behaviour_logprobs.tolist() for m in got.members] == [[-0.5, -0.25], [-1.0]]
