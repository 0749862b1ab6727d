"""The gloo transport's bucket plan and packing (pure parts of rollout/weight_wire.py)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.weight_wire import ALIGN, UpdatePlan, layout, plan_buckets, views

shapes = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=30)


@settings(deadline=None, max_examples=60)
@given(shapes, st.integers(64, 20_000), st.sampled_from(["float32", "bfloat16"]))
def test_buckets_keep_order_and_bound_size(dims, bucket_bytes, dtype):
    params = [(f"p{i}", dtype, d) for i, d in enumerate(dims)]
    plan = plan_buckets(params, bucket_bytes)
    assert [n for b in plan.buckets() for n, _, _ in b] == [p[0] for p in params]
    for bucket in plan.buckets():
        offsets, size = layout(bucket)
        assert all(off % ALIGN == 0 for off in offsets)
        # Only a parameter larger than a bucket may make one larger than bucket_bytes, and then alone.
        assert size <= bucket_bytes or len(bucket) == 1


@settings(deadline=None, max_examples=30)
@given(shapes)
def test_packed_views_round_trip(dims):
    tensors = {f"p{i}": torch.randn(d, dtype=torch.float32) for i, d in enumerate(dims)}
    plan = plan_buckets([(n, "float32", list(t.shape)) for n, t in tensors.items()], 4096)
    for bucket in plan.buckets():
        buffer = torch.empty(layout(bucket)[1], dtype=torch.uint8)
        for view, (name, _, _) in zip(views(buffer, bucket), bucket):
            view.copy_(tensors[name])
        copy = buffer.clone()  # what a receiver gets from the broadcast
        for view, (name, _, _) in zip(views(copy, bucket), bucket):
            assert torch.equal(view, tensors[name])


def test_a_plan_that_does_not_cover_its_parameters_is_refused():
    try:
        UpdatePlan(["a", "b"], ["float32", "float32"], [[1], [2]], [1])
    except ValueError as e:
        assert "buckets hold 1" in str(e)
    else:
        raise AssertionError("accepted")
