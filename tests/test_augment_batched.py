"""Batched STL augmentation: many demonstrations in one tensor program, replays through mujoco.rollout.

The batched path must store what augmenting each demonstration alone stores, and every stored episode must replay
in MuJoCo (the env's own step loop) to its stored signals and satisfy its θ there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_augment import calibrated_demos, replay_crossing

CROSSING = "stlflow/Crossing-v0"
FRONT_AND_RIGHT = {
    "param_ranges": {"v_max": [1.2, 1.6], "d_safe": [0.2, 0.4], "w": [1.5, 1.75], "T": [12.0, 16.0]},
    "time_params": ["T"],
    "init_low": [0.6, -0.3],
    "init_high": [1.6, 0.3],
    "modes": {"front": {"formula": "G((abs(ped_dx) <= 0.5) -> (ped_ahead >= {d_pass}))",
                        "param_ranges": {"d_pass": [0.3, 0.5]}},
              "right": {"formula": "G((abs(ped_dx) <= 0.5) -> (lateral <= -{y_side}))",
                        "param_ranges": {"y_side": [0.6, 0.9]}}},
}
SMALL = dict(per_demo=2, n_theta=1, n_init=6, iters=40, max_replays=6, time_params=("T",))


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Three calibrated expert episodes of Crossing."""
    from stlflow.datasets import EpisodeStore

    path = tmp_path_factory.mktemp("augb") / "demos.zarr"
    calibrated_demos(path)
    return EpisodeStore.open(path)


def _task(dtype: str = "float32"):
    from stlflow.control.stl_data import make_augment_task

    return make_augment_task(CROSSING, {}, FRONT_AND_RIGHT, None, dtype)


def _specs(task, store):
    from stlflow.datasets.augment_batch import DemoSpec

    out = []
    for i in range(store.n_episodes):
        attrs = store.episode_attrs(i)
        out.append(DemoSpec(task.window(store.episode(i), attrs), attrs["mode"],
                            {**task.defaults, **attrs["stl_params"]}, (5, i)))
    return out


def _run(task, specs, stack, **over):
    from stlflow.datasets.augment import AugmentSettings
    from stlflow.datasets.augment_batch import augment_demos
    from stlflow.stl import parse

    s = AugmentSettings(**{**SMALL, **over})
    return augment_demos(specs, task.rules, task.modes, task.param_ranges, task.control_low, task.control_high,
                         task.dt, s, parse, init_low=task.init_low, init_high=task.init_high, stack=stack)


# ------------------------------------------------------------------------------------------------ the drive model
def test_drive_rollout_matches_the_model_and_its_gradient():
    from stlflow.control.tasks.crossing_augment import drive_rollout
    from stlflow.envs.crossing_dynamics import CrossingDynamics

    model = CrossingDynamics()
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(16, 5, generator=g, dtype=torch.float64) * 0.3
    u = torch.rand(16, 40, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 6.0], dtype=torch.float64)
    u = (u - torch.tensor([0.9, 3.0], dtype=torch.float64)).requires_grad_(True)  # some outside the bounds
    weight = torch.randn(16, 40, 5, generator=g, dtype=torch.float64)
    ref = model.rollout(s0, u)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), u)
    out = drive_rollout(s0, u, model)
    (grad,) = torch.autograd.grad((out * weight).sum(), u)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sub-steps"):
        drive_rollout(s0, u, CrossingDynamics(substeps=4))


def test_drive_scan_and_step_sums_gradcheck():
    from stlflow.control.tasks.crossing_augment import _DriveScan, _StepSums

    g = torch.Generator().manual_seed(1)
    s0, u = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((3, 2), (3, 6, 2)))
    c = torch.tensor([0.2, 0.4], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: _DriveScan.apply(a, b, c), (s0, u))
    xs = [torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    assert torch.autograd.gradcheck(lambda *a: _StepSums.apply(*a, 0.01), xs)


# ------------------------------------------------------------------------------------------------ time-bound masks
def test_time_bounds_are_masked_only_where_that_is_exact():
    from stlflow.datasets.augment_optim import maskable_time_bound
    from stlflow.stl import parse

    assert maskable_time_bound(parse("G(a <= 1) & F[0,{T}](d <= {eps})"), "T") == ("d", 1.0)
    assert maskable_time_bound(parse("(G(a <= 1) & F[0,{T}](d >= 2)) & G(b >= 0)"), "T") == ("d", -1.0)
    assert maskable_time_bound(parse("G(a <= 1) & F[0,{T}](3 <= d)"), "T") == ("d", -1.0)
    assert maskable_time_bound(parse("G(d <= 5) & F[0,{T}](d <= 1)"), "T") is None  # the signal is used elsewhere
    assert maskable_time_bound(parse("G(F[0,{T}](d <= 1))"), "T") is None  # nested: not at time 0 only
    assert maskable_time_bound(parse("F[0,{T}](d <= 1) | G(a <= 1)"), "T") is None  # not a conjunct
    assert maskable_time_bound(parse("F[1,{T}](d <= 1)"), "T") is None  # window not from 0
    assert maskable_time_bound(parse("F[0,{T}](d <= 1) & G[0,{T}](a <= 1)"), "T") is None  # T used twice


@pytest.mark.parametrize("smooth", [None, 30.0])
def test_masked_evaluation_equals_one_evaluation_per_time_bound(smooth):
    """Groups whose T differ share one robustness call; each candidate's robustness is that of its own T."""
    from stlflow.datasets.augment import DemoWindow
    from stlflow.datasets.augment_optim import CandidateGroup, WindowBatch, _evaluate, _evaluation_units, group_index
    from stlflow.stl import parse

    spec = parse("G(a <= {v}) & F[0,{T}](d <= {eps})")
    g = torch.Generator().manual_seed(2)
    sig = {"a": torch.rand(9, 30, generator=g, dtype=torch.float64),
           "d": torch.rand(9, 30, generator=g, dtype=torch.float64) * 2}
    window = DemoWindow(30, lambda c: c, lambda states: {k: v[: len(states)] for k, v in sig.items()},
                        lambda s: s, lambda c: None)
    groups = [CandidateGroup("m", spec, {"v": 0.9, "T": t, "eps": e}, 3)
              for t, e in ((1.0, 0.3), (2.0, 0.5), (0.5, 0.3))]
    units = _evaluation_units(groups, torch.float64, 0.1)
    assert len(units) == 1 and units[0].masks and units[0].params["T"] == 2.0
    rows = torch.arange(9)
    rho = _evaluate(WindowBatch.of([window]), units, group_index(groups), torch.zeros(9, dtype=torch.long),
                    torch.zeros(9, 30, 1, dtype=torch.float64), rows, 0.1, smooth)
    for j, grp in enumerate(groups):
        part = {k: v[3 * j : 3 * j + 3] for k, v in sig.items()}
        own = spec.robustness(part, dt=0.1, params=grp.theta, smooth=smooth)
        torch.testing.assert_close(rho[3 * j : 3 * j + 3], own, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the optimiser
def _toy_window(offset: float):
    """A window whose 'dynamics' add ``offset`` to the single control channel; signal ``a`` is that state."""
    from stlflow.datasets.augment import DemoWindow

    return DemoWindow(12, lambda c: c + offset, lambda st: {"a": st[..., 0]}, lambda st: st, lambda c: None)


def _toy_problems(seed: int):
    from stlflow.datasets.augment_optim import CandidateGroup, DemoProblem
    from stlflow.stl import parse

    spec = parse("G(a <= {hi}) & F[0,{T}](a >= {lo})")
    out = []
    for d, (hi, t) in enumerate(((0.3, 0.4), (0.5, 0.8))):
        groups = [CandidateGroup("m", spec, {"hi": hi, "lo": hi - 0.1, "T": t}, 5),
                  CandidateGroup("m", spec, {"hi": hi + 0.1, "lo": hi - 0.05, "T": t + 0.2}, 4)]
        out.append(DemoProblem(groups, torch.Generator().manual_seed(seed + d)))
    return out


def test_optimise_batch_equals_each_problem_alone():
    """Two demonstrations (different dynamics, θ and time bounds) in one batch against each alone: the same
    controls and robustness (float64), because draws, Adam and losses are per candidate."""
    from stlflow.datasets.augment import AugmentSettings, WindowBatch
    from stlflow.datasets.augment_optim import optimise_batch, optimise_controls

    s = AugmentSettings(iters=25, check_every=5, lr=0.05, margin=0.01, knot_every=3, dtype="float64")
    lo, hi = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    windows = [_toy_window(0.0), _toy_window(-0.2)]
    together = optimise_batch(_toy_problems(0), WindowBatch.of(windows), lo, hi, 0.1, s)
    for problem, window, got in zip(_toy_problems(0), windows, together):
        alone = optimise_controls(problem.groups, window, lo, hi, 0.1, s, problem.generator)
        for x, y in zip(got, alone):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert (torch.cat([r for _, r, _ in together]) >= s.margin).any()


def test_pruning_stops_candidates_far_from_satisfying():
    from stlflow.datasets.augment import AugmentSettings, WindowBatch
    from stlflow.datasets.augment_optim import optimise_batch

    lo, hi = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    seen = {}
    s = AugmentSettings(iters=25, check_every=5, lr=0.05, margin=0.01, knot_every=3, dtype="float64", prune_at=5,
                        prune_below=100.0)  # everything not yet satisfying at iteration 5 stops there
    out = optimise_batch(_toy_problems(1), WindowBatch.of([_toy_window(0.0), _toy_window(-0.2)]), lo, hi, 0.1, s,
                         on_check=lambda it, done: seen.setdefault(it, done.clone()))
    assert set(seen) == {0, 5} and seen[5].all() and not seen[0].all()
    free = optimise_batch(_toy_problems(1), WindowBatch.of([_toy_window(0.0), _toy_window(-0.2)]), lo, hi, 0.1,
                          AugmentSettings(**{**s.__dict__, "prune_at": 0}))
    n_pruned, n_free = (sum(int((r >= s.margin).sum()) for _, r, _ in x) for x in (out, free))
    assert n_pruned < n_free


# ------------------------------------------------------------------------------------------------ the whole batch
@pytest.fixture(scope="module")
def batched64(demos):
    """The three demonstrations augmented in one batch, in float64 (shared by the tests below)."""
    task = _task("float64")
    specs = _specs(task, demos)
    return task, specs, _run(task, specs, task.stack, dtype="float64", per_demo=3)


def _alone(task, spec, **over):
    """One demonstration through :func:`augment_demo` and its own window (the path before batching)."""
    from stlflow.datasets.augment import AugmentSettings, augment_demo
    from stlflow.stl import parse

    s = AugmentSettings(**{**SMALL, "dtype": "float64", **over})
    return augment_demo(spec.window, task.rules, task.modes, spec.mode, spec.theta, task.param_ranges,
                        task.control_low, task.control_high, task.dt, s, seed=spec.seed, parse=parse,
                        init_low=task.init_low, init_high=task.init_high)


def _assert_same(b, a):
    assert (b.n_candidates, b.n_satisfying, b.n_replayed, b.n_accepted, b.rejected_modes) == \
           (a.n_candidates, a.n_satisfying, a.n_replayed, a.n_accepted, a.rejected_modes)
    assert b.modes_satisfied == a.modes_satisfied
    for (arr_b, att_b), (arr_a, att_a) in zip(b.episodes, a.episodes):
        assert att_b["mode"] == att_a["mode"] and att_b["stl_params"] == att_a["stl_params"]
        assert att_b["success"] == att_a["success"] and att_b["length"] == att_a["length"]
        np.testing.assert_allclose(arr_b["action"], arr_a["action"], rtol=0, atol=1e-6)
        assert att_b["rho_replay"] == pytest.approx(att_a["rho_replay"], abs=1e-6)


def test_batched_augmentation_stores_what_one_demo_alone_stores(batched64):
    """Demonstration 0 of the batch (Crossing's batched drive model, mujoco.rollout replays) against the same
    demonstration alone through its own window (the robot model's rollout, control-loop replays).

    In float64. The documented difference: the batched drive model sums the same terms in another order, so in
    float32 the optimiser's paths drift apart by round-off (actions ~1e-3 apart after tens of Adam steps); which
    candidates satisfy and which episodes are stored can then differ for a candidate on the margin."""
    task, specs, batched = batched64
    assert batched[0].n_accepted > 0
    _assert_same(batched[0], _alone(task, specs[0], per_demo=3))


@pytest.mark.slow
def test_batched_augmentation_stores_what_each_demo_alone_stores(batched64):
    """The same for every demonstration of the batch (one of them has a longer horizon: a batch of its own)."""
    task, specs, batched = batched64
    for b, spec in zip(batched, specs):
        _assert_same(b, _alone(task, spec, per_demo=3))


def test_every_stored_episode_replays_in_mujoco_to_its_signals_and_satisfies_its_theta(demos, batched64):
    from stlflow.datasets.augment_theta import spec_text
    from stlflow.envs import make_env
    from stlflow.stl import parse

    task, _, results = batched64
    env = make_env(CROSSING)
    specs = {m.name: parse(spec_text(task.rules, m)) for m in task.modes}
    n = 0
    for i, res in enumerate(results):
        for arrays, attrs in res.episodes:
            first, nxt, sig, collided = replay_crossing(env, demos.episode_attrs(i)["seed"], arrays["action"])
            np.testing.assert_array_equal(first, arrays["obs"][0])
            np.testing.assert_array_equal(np.asarray(nxt[:-1]), arrays["obs"][1:])
            for k, v in arrays["signals"].items():
                np.testing.assert_allclose(v, sig[k], rtol=0, atol=1e-6, err_msg=k)
            spec = specs[attrs["mode"]]
            rho = float(spec.robustness({k: torch.as_tensor(sig[k]) for k in spec.signals}, dt=task.dt,
                                        params=attrs["stl_params"]))
            assert not collided and rho >= 0 and rho == pytest.approx(attrs["rho_replay"], abs=1e-9)
            n += 1
    assert n > 0


def test_rollout_replay_equals_the_env_replay_including_collisions_and_fallbacks(demos):
    """mujoco.rollout replays equal the control loop's, field by field: goal reached, pedestrian hit (read from the
    rollout), wall contact (replayed through the env, since the drive's targets do not include wall forces)."""
    from stlflow.control.tasks.crossing import CrossingAugmentation
    from stlflow.control.tasks.crossing_replay import replay_batch
    from stlflow.control.tasks.replay import replay_controls
    from stlflow.envs import make_env

    env = make_env(CROSSING)
    items = []
    for i in range(demos.n_episodes):
        seed = demos.episode_attrs(i)["seed"]
        env.reset(seed=seed)
        dir_y = float(np.sign(env.unwrapped.peds.direction[0, 1]))
        act = demos.episode(i)["action"]
        items += [((env, seed, dir_y), act),                                        # the demo: reaches the goal
                  ((env, seed, dir_y), np.tile([[1.6, 0.0]], (120, 1))),             # straight on, full speed
                  ((env, seed, dir_y), np.tile([[1.0, 0.0]], (120, 1))),             # straight on, slower
                  ((env, seed, dir_y), np.tile([[1.6, 1.0]], (60, 1))),              # into a wall
                  ((env, seed, dir_y), act[:20] + np.float32([0.3, 0.2]))]           # cut short
    stats: dict[str, int] = {}
    batch = replay_batch(items, threads=2, stats=stats)
    outcomes = set()
    for ((e, seed, dir_y), c), got in zip(items, batch):
        want, ep = replay_controls(e, seed, c)
        want.signals.update(CrossingAugmentation.mode_signals_from_obs(ep.obs[1:], dir_y))
        assert (got.collision, got.attrs) == (want.collision, want.attrs)
        np.testing.assert_array_equal(got.action, want.action)
        np.testing.assert_allclose(got.obs, want.obs, rtol=0, atol=1e-5)
        assert got.signals.keys() == want.signals.keys()
        for k in want.signals:
            np.testing.assert_allclose(got.signals[k], want.signals[k], rtol=0, atol=1e-5, err_msg=k)
        outcomes.add("collision" if want.collision else "success" if want.attrs["success"] else "open")
    assert outcomes == {"collision", "success", "open"}
    assert stats["rollout"] >= 2 * demos.n_episodes and stats["fallback"] >= demos.n_episodes  # walls


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_batches_are_refused_clearly(demos):
    from stlflow.datasets.augment import DemoWindow, WindowBatch

    task = _task()
    specs = _specs(task, demos)
    other = DemoWindow(7, specs[0].window.rollout, specs[0].window.signals, specs[0].window.positions,
                       specs[0].window.replay, data=specs[0].window.data)
    with pytest.raises(ValueError, match="share their horizon"):
        WindowBatch.of([specs[0].window, other])
    with pytest.raises(ValueError, match="share their horizon"):
        task.stack([specs[0].window, other], 1)
    with pytest.raises(ValueError, match="optimiser must be 'adam' or 'cem'"):
        _run(task, specs[:1], task.stack, optimiser="sgd")
    from stlflow.datasets.augment import AugmentSettings
    from stlflow.datasets.augment_batch import augment_demos
    from stlflow.stl import parse

    with pytest.raises(ValueError, match="at least one ModeSpec"):
        augment_demos(specs[:1], task.rules, [], task.param_ranges, task.control_low, task.control_high, task.dt,
                      AugmentSettings(**SMALL), parse)
    assert _run(task, [], task.stack) == []


def test_pickplace_rollout_equals_the_step_by_step_rollout(tmp_path):
    """PickPlace's CEM rollouts through mujoco.rollout (2 threads) equal stepping the env, bit for bit."""
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob
    from stlflow.control.stl_data import make_augment_task

    store = collect(CollectJob("pickplace", 2, tmp_path / "pp.zarr", seed=3, progress=False))
    task = make_augment_task("stlflow/PickPlace-v0", {}, {"retime": {"speed_fraction": 0.85}}, None, "float32")
    windows = [task.window(store.episode(i), store.episode_attrs(i)) for i in range(2)]
    rng = np.random.default_rng(0)
    for w in windows:
        batch, k = task.stack([w], 2), 0  # windows of different horizons go to different batches
        nom = w.nominal_for("*", {"v_max": 0.4})
        noise = np.concatenate([rng.normal(0, 0.01, (3, *nom[:, :3].shape)), np.zeros((3, len(nom), 1))], -1)
        c = torch.as_tensor(nom[None] + noise)
        np.testing.assert_array_equal(batch.rollout(c, torch.full((3,), k)).numpy(), w.rollout(c).numpy())
