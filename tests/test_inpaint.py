"""Inpainting toward committed actions: the RTI controller's pinned prefix and real-time chunking's soft mask, on real
(tiny, randomly initialised) policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rti import TO, TP, NetCalls, observations, tiny_policy

from stlflow.policy.inpaint import rtc_sample, rtc_weights
from stlflow.policy.rti import RTIController

torch.set_num_threads(1)


@settings(max_examples=25)
@given(kind=st.sampled_from(["flow", "ddpm", "meanflow"]), k=st.integers(1, 3), frozen=st.integers(1, 4),
       elapsed=st.integers(1, 3), seed=st.integers(0, 3), renoise=st.booleans())
def test_warm_tick_never_changes_the_committed_prefix(kind, k, frozen, elapsed, seed, renoise):
    policy = tiny_policy(kind, seed=seed)
    ctrl = RTIController(policy, k=k, frozen=frozen, renoise=renoise, t_start=0.5, seed=seed)
    obs = observations(12, seed=seed, step=0.3)
    ctrl.reset()
    ctrl.act(obs[0])
    for i in range(1, 4):
        guess = ctrl.warm_start(ctrl._chunk, shift=elapsed)
        ctrl.act(obs[i], elapsed=elapsed)
        n = min(ctrl.exec_offset + frozen, TP)
        assert torch.equal(ctrl._chunk[:, :n], guess[:, :n])
        if n < TP:  # and the rest was really denoised (not copied): it moved, unless the guess already sat at
            # DDPM's clip bound (+-clip_sample), where a clean-chunk estimate clamps to the same values
            clip = float(getattr(policy.head, "clip_sample", 0) or 0)
            saturated = bool(clip) and bool(guess[:, n:].abs().eq(clip).all())
            assert saturated or not torch.equal(ctrl._chunk[:, n:], guess[:, n:])


def test_frozen_zero_is_plain_rti():
    a, b = RTIController(tiny_policy("ddpm"), k=2, seed=3), RTIController(tiny_policy("ddpm"), k=2, frozen=0, seed=3)
    obs = observations(6)
    for ctrl in (a, b):
        ctrl.reset()
    assert all(np.array_equal(a.act(o), b.act(o)) for o in obs)
    c = RTIController(tiny_policy("ddpm"), k=2, frozen=2, seed=3)
    c.reset()
    assert not all(np.array_equal(a.act(o), c.act(o)) for o in obs)  # the pin changes what follows
    with pytest.raises(ValueError, match="frozen"):
        RTIController(tiny_policy(), frozen=-1)


@pytest.mark.parametrize(("kind", "head"), [("flow", {}), ("ddpm", {}), ("meanflow", {}), ("ddpm", {"clip_sample": 0})])
def test_rtc_with_a_zero_mask_is_plain_sampling(kind, head):
    policy = tiny_policy(kind, seed=1, **head)
    cond = policy.condition(observations(TO)[None])
    target = torch.randn(1, TP, 2)
    plain = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(7))
    calls = NetCalls(policy)
    inpainted = rtc_sample(policy, cond, target, torch.zeros(TP), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(inpainted, plain, atol=1e-5, rtol=1e-5)
    assert calls.n == policy.nfe()


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_rtc_pulls_the_frozen_part_toward_the_target(kind):
    policy = tiny_policy(kind, seed=2)
    cond = policy.condition(observations(TO)[None])
    target = torch.full((1, TP, 2), 0.8)
    w = rtc_weights(TP, TO - 1, 3, 5)
    gaps = []
    for weights in (torch.zeros(TP), w):
        x = rtc_sample(policy, cond, target, weights, generator=torch.Generator().manual_seed(0))
        gaps.append(float((x - target)[:, : TO - 1 + 3].abs().mean()))
    assert gaps[1] < 0.5 * gaps[0]


def test_rtc_weights_follow_the_paper_shape():
    w = rtc_weights(16, 1, 2, 8).numpy()
    assert np.all(w[:3] == 1.0)  # past action and the d = 2 frozen ones
    assert np.all(np.diff(w[3:9]) < 0) and 0 < w[8] < w[3] < 1  # the decay over the rest of the overlap
    assert np.all(w[9:] == 0.0)
    assert rtc_weights(16, 1, 0, 0).sum() == 1.0  # nothing committed, no overlap: only the past action
