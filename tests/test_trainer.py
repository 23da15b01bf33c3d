"""The trainer: loss decreases, multimodal data is reproduced (not averaged), exact resume, checkpoints, CLI."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stlflow.datasets import EpisodeStore
from stlflow.policy import Policy
from stlflow.policy.data import ChunkData, episode_params
from stlflow.policy.distill import Distiller
from stlflow.policy.trainer import TrainConfig, Trainer, adamw, ema_decay, lr_lambda

torch.set_num_threads(1)

NET = {"name": "mlp", "width": 64, "n_blocks": 2, "time_embed_dim": 32}


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, progress=False, val_every=0, ckpt_every=0,
                tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _store(path, n_episodes=12, length=30, seed=0) -> EpisodeStore:
    """A real zarr store: obs = a 2-D point on a circle, action = its next position (smooth, learnable)."""
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path, dt=0.1)
    for i in range(n_episodes):
        phase = rng.uniform(0, 2 * np.pi) + 0.1 * np.arange(length + 1)
        xy = np.stack([np.cos(phase), np.sin(phase)], -1).astype(np.float32)
        store.add_episode({"obs": xy[:-1], "action": xy[1:] * 3.0},
                          attrs={"seed": i, "stl_params": {"v_max": 0.5 + 0.1 * i, "d_safe": 1.0}})
    return EpisodeStore.open(path)


def test_lr_schedule_and_ema_decay():
    assert lr_lambda(0, 10, 100) == pytest.approx(0.1) and lr_lambda(9, 10, 100) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100) == pytest.approx(0.5) and lr_lambda(100, 10, 100) == pytest.approx(0.0)
    vals = [lr_lambda(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert ema_decay(0) == 0.0
    assert ema_decay(10) == pytest.approx(1 - 11**-0.75)
    assert ema_decay(10**9) == 0.9999
    decays = [ema_decay(s) for s in range(1, 2000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_loss_decreases_on_a_real_store_and_theta_comes_from_episode_attrs(tmp_path):
    store = _store(tmp_path / "demos.zarr")
    theta = episode_params(store, ["v_max", "d_safe"])
    np.testing.assert_allclose(theta[:, 0], 0.5 + 0.1 * np.arange(12), rtol=1e-6)
    data = ChunkData(store, horizon=8, n_obs_steps=2, n_action_steps=4, params=theta)
    batch = data.batch([0, 5, 40])
    assert batch["obs"].shape == (3, 2, 2) and batch["action"].shape == (3, 8, 2) and batch["params"].shape == (3, 2)
    np.testing.assert_allclose(batch["params"][:, 0].numpy(), theta[data.sampler.window_episode[[0, 5, 40]], 0])
    torch.manual_seed(0)
    policy = Policy(2, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, param_names=["v_max", "d_safe"],
                    normalizer=data.fit_normalizer())
    trainer = Trainer(policy, data, _cfg(steps=150), tmp_path / "out")
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15])
    with pytest.raises(KeyError, match="stl_params lack"):
        episode_params(store, ["v_max", "t_goal"])


def _bimodal_data() -> ChunkData:
    # Episodes act +1 or -1 for their whole length from the same (zero) observation: two separated modes.
    rng = np.random.default_rng(0)
    n_ep, length = 40, 12
    sign = np.where(np.arange(n_ep) % 2 == 0, 1.0, -1.0)
    act = np.repeat(sign, length)[:, None] * np.ones((1, 2)) + 0.02 * rng.standard_normal((n_ep * length, 2))
    return ChunkData({"obs": np.zeros((n_ep * length, 3)), "action": act}, 8, 2, 4,
                     episode_ends=np.arange(1, n_ep + 1) * length)


@pytest.mark.parametrize("kind,solvers", [("ddpm", [None]), ("flow", ["euler", "midpoint"]), ("meanflow", [None])])
def test_multimodal_toy_is_reproduced_not_averaged(tmp_path, kind, solvers):
    data = _bimodal_data()
    torch.manual_seed(0)
    policy = Policy(3, 2, 2, 8, 4, head={"kind": kind}, net=NET, normalizer=data.fit_normalizer())
    trainer = Trainer(policy, data, _cfg(steps=500, batch_size=64, warmup_steps=20), tmp_path)
    trainer.fit()
    ema = trainer.ema.model
    for solver in solvers:
        if solver:
            ema.head.solver = solver
        chunk = ema.predict(np.zeros((300, 2, 3)), generator=torch.Generator().manual_seed(1))
        m = chunk[:, :, 0].mean(1)  # each chunk's mean action on channel 0: near +1 or -1, not 0
        plus, minus, between = (m > 0.5).mean(), (m < -0.5).mean(), (np.abs(m) < 0.5).mean()
        assert plus > 0.3 and minus > 0.3 and between < 0.25, (kind, solver, plus, minus, between)


class _ExactVelocity(torch.nn.Module):
    """The marginal velocity of a one-point dataset x0 = a: v(z, t) = (z - a) / t (= ε - a on every path)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a
        self.unused = torch.nn.Parameter(torch.zeros(()))  # a Policy needs one parameter (its device)

    def forward(self, z, times, cond):
        return (z - self.a) / times[:, :1, None]


def test_distilling_from_the_exact_marginal_velocity_gives_the_plain_meanflow_loss():
    # One data point: ε - x0 IS the marginal velocity, so the teacher's target and tangent equal the plain ones on
    # every row (r = t and r < t): the losses must agree. A wiring error (time, normalisation, cond) breaks this.
    torch.manual_seed(0)
    data = ChunkData({"obs": np.zeros((40, 3)), "action": np.random.default_rng(0).normal(size=(40, 2))}, 8, 2, 4,
                     episode_ends=np.array([40]))
    norm = data.fit_normalizer()
    # plain MSE (adaptive_p = 0): with the adaptive weight every row's loss is ~1, which would hide a wrong teacher
    student = Policy(3, 2, 2, 8, 4, head={"kind": "meanflow", "ratio_r_neq_t": 0.5, "adaptive_p": 0.0}, net=NET,
                     normalizer=norm)
    teacher = Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm)
    batch = data.batch([7] * 64)
    teacher.head.net = _ExactVelocity(student.normalize_action(batch["action"][:1]))
    noise = student.draw_noise(64, generator=torch.Generator().manual_seed(3))
    assert 0 < int((noise["r"] < noise["t"]).sum()) < 64  # both kinds of rows are exercised
    plain = student.compute_loss(batch, noise)
    distiller = Distiller(student, teacher)
    torch.testing.assert_close(distiller.draw_noise(64, generator=torch.Generator().manual_seed(3)), noise)
    distilled = distiller.compute_loss(batch, noise)
    torch.testing.assert_close(distilled, plain, rtol=1e-4, atol=1e-6)
    # a wrong teacher changes the loss (the check can fail)
    teacher.head.net = _ExactVelocity(student.normalize_action(batch["action"][:1]) + 0.5)
    assert abs(float(distiller.compute_loss(batch, noise)) - float(plain)) > 1e-2
    # the student itself knows nothing of the teacher: its own loss is the plain one
    torch.testing.assert_close(student.compute_loss(batch, noise), plain)
    assert list(distiller.parameters()) == list(student.parameters())  # the teacher is outside the module tree
    assert distiller.state_dict().keys() == {f"student.{k}" for k in student.state_dict()}


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_flow_map_distillation_regresses_on_the_teachers_own_paths(solver):
    # The teacher's velocity (z - a) / t walks every path z_t = a + t (ε - a) exactly (both solvers), so the average
    # velocity over any grid pair [r, t] is ε - a: a student that is exactly this map has zero loss on every pair,
    # and a student off by δ has loss |δ|² / t² averaged over the drawn rows (the check can fail).
    torch.manual_seed(0)
    data = ChunkData({"obs": np.zeros((40, 3)), "action": np.random.default_rng(0).normal(size=(40, 2))}, 8, 2, 4,
                     episode_ends=np.array([40]))
    norm = data.fit_normalizer()
    # plain MSE, so that the loss of an offset student is the closed form below
    student = Policy(3, 2, 2, 8, 4, head={"kind": "meanflow", "adaptive_p": 0.0}, net=NET, normalizer=norm)
    teacher = Policy(3, 2, 2, 8, 4, head={"kind": "flow", "solver": solver}, net=NET, normalizer=norm)
    a = torch.randn(1, 8, 2)
    teacher.head.net = _ExactVelocity(a)
    distiller = Distiller(student, teacher, mode="trajectory", pairs=4, steps=5)
    states, vels, times = teacher.head.trajectory(torch.zeros(3, 6), torch.randn(3, 8, 2), steps=5)
    assert states.shape == (6, 3, 8, 2) and vels.shape == (5, 3, 8, 2)
    torch.testing.assert_close(times, torch.linspace(1.0, 0.0, 6))
    torch.testing.assert_close(states[-1], a.expand(3, 8, 2))  # the path ends on the data point
    batch = data.batch(list(range(32)))
    noise = distiller.draw_noise(32, generator=torch.Generator().manual_seed(3))
    assert noise["traj_eps"].shape == (8, 8, 2) and noise["traj_i"].shape == (8, 4)
    student.head.net = _ExactVelocity(a)  # u(z, r, t) = (z - a) / t: the exact average velocity on these paths
    assert float(distiller.compute_loss(batch, noise)) < 1e-10
    student.head.net = _ExactVelocity(a + 0.3)
    t = torch.linspace(1.0, 0.0, 6)[noise["traj_i"]]
    expected = float((0.09 / t**2).mean())
    assert float(distiller.compute_loss(batch, noise)) == pytest.approx(expected, rel=1e-4)


def test_flow_map_pairs_cover_the_grid_and_always_include_the_one_step_jump():
    norm = _bimodal_data().fit_normalizer()
    student = Policy(3, 2, 2, 8, 4, head={"kind": "meanflow"}, net=NET, normalizer=norm)
    distiller = Distiller(student, Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm),
                          mode="trajectory", pairs=5, steps=4)
    noise = distiller.draw_noise(4000, generator=torch.Generator().manual_seed(0))
    i, j = noise["traj_i"], noise["traj_j"]
    assert i.shape == (800, 5)
    assert (i[:, 0] == 0).all() and (j[:, 0] == 4).all()  # (t, r) = (1, 0): the jump one-step sampling takes
    assert ((0 <= i) & (i <= j) & (j <= 4) & (i < 4)).all()  # t >= r on the grid, t > 0
    seen = {(int(x), int(y)) for x, y in zip(i[:, 1:].flatten(), j[:, 1:].flatten())}
    assert seen == {(x, y) for x in range(4) for y in range(x, 5)}  # every pair, r = t rows included
    with pytest.raises(ValueError, match="velocity' or 'trajectory"):
        Distiller(student, Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm), mode="path")


def test_flow_map_distillation_of_a_theta_conditioned_policy_keeps_dropout_per_path():
    from stlflow.datasets import Normalizer

    data = _bimodal_data()
    norm = Normalizer.fit({"obs": np.zeros((2, 3)), "action": np.zeros((2, 2)), "params": np.array([[0.5], [1.5]])},
                          modes="identity")
    student, teacher = (Policy(3, 2, 2, 8, 4, head={"kind": kind}, net=NET, normalizer=norm, param_names=["v_max"])
                        for kind in ("meanflow", "flow"))
    distiller = Distiller(student, teacher, mode="trajectory", pairs=4, steps=3)
    noise = distiller.draw_noise(32, generator=torch.Generator().manual_seed(0))
    assert noise["cfg_keep"].shape == (8,)  # one θ-dropout draw per teacher path
    batch = {**data.batch(list(range(32))), "params": torch.rand(32, 1) + 0.5}
    loss = distiller.compute_loss(batch, noise)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_distiller_refuses_a_teacher_that_does_not_match():
    data = _bimodal_data()
    norm = data.fit_normalizer()
    student = Policy(3, 2, 2, 8, 4, head={"kind": "meanflow"}, net=NET, normalizer=norm)
    with pytest.raises(ValueError, match="must be a flow policy"):
        Distiller(student, Policy(3, 2, 2, 8, 4, head={"kind": "ddpm"}, net=NET, normalizer=norm))
    with pytest.raises(ValueError, match="normalizer"):
        Distiller(student, Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET))
    with pytest.raises(ValueError, match="horizon"):
        Distiller(student, Policy(3, 2, 2, 10, 4, head={"kind": "flow"}, net=NET, normalizer=norm))
    with pytest.raises(ValueError, match="only a meanflow policy"):
        Distiller(Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm),
                  Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm))


@pytest.mark.parametrize("distil", ["velocity", "trajectory"])
def test_a_meanflow_policy_distilled_from_a_flow_checkpoint_keeps_both_modes(tmp_path, distil):
    data = _bimodal_data()
    norm = data.fit_normalizer()
    torch.manual_seed(0)
    teacher = Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=norm)
    Trainer(teacher, data, _cfg(steps=500, batch_size=64, warmup_steps=20), tmp_path / "teacher").fit()
    torch.manual_seed(1)
    # the distillation recipe (ratio 0.5, plain MSE), not the from-scratch default (0.25, adaptive weight p = 1)
    student = Policy(3, 2, 2, 8, 4, head={"kind": "meanflow", "ratio_r_neq_t": 0.5, "adaptive_p": 0.0}, net=NET,
                     normalizer=norm)
    trainer = Trainer(student, data, _cfg(steps=500, batch_size=64, warmup_steps=20,
                                          teacher=str(tmp_path / "teacher"), distil=distil), tmp_path / "student")
    trainer.fit()
    saved = Policy.load(tmp_path / "student")  # an ordinary meanflow checkpoint: no teacher weights in it
    assert saved.state_dict().keys() == student.state_dict().keys()
    assert not any(k.startswith("_teacher") for k in load_file(str(tmp_path / "student" / "model.safetensors")))
    assert "_teacher" not in saved.__dict__
    chunk = saved.predict(np.zeros((300, 2, 3)), generator=torch.Generator().manual_seed(1))  # one step
    m = chunk[:, :, 0].mean(1)
    plus, minus, between = (m > 0.5).mean(), (m < -0.5).mean(), (np.abs(m) < 0.5).mean()
    assert plus > 0.3 and minus > 0.3 and between < 0.25, (plus, minus, between)


def _losses_csv(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_exact_resume_of_flow_map_distillation(tmp_path):
    """The teacher's paths are drawn from each step's own noise: a resumed distillation repeats the losses exactly."""
    store = _store(tmp_path / "demos.zarr", n_episodes=6)
    data = ChunkData(store, horizon=8, n_obs_steps=2, n_action_steps=4)
    norm = data.fit_normalizer()
    torch.manual_seed(0)
    teacher = Policy(2, 2, 2, 8, 4, head={"kind": "flow", "default_steps": 4}, net=NET, normalizer=norm)
    Trainer(teacher, data, _cfg(steps=10, batch_size=16), tmp_path / "teacher").fit()

    def make(out, resume=False):
        torch.manual_seed(0)
        policy = Policy(2, 2, 2, 8, 4, head={"kind": "meanflow"}, net=NET, normalizer=norm)
        cfg = _cfg(steps=20, batch_size=16, teacher=str(tmp_path / "teacher"), distil="trajectory", distil_pairs=2)
        return Trainer(policy, data, cfg, out, resume=resume)

    full = make(tmp_path / "full")
    full.fit()
    part = make(tmp_path / "part")
    part.fit(until=13)
    torch.manual_seed(999)
    resumed = make(tmp_path / "part", resume=True)
    resumed.fit()
    assert [h["loss"] for h in full.history[13:]] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("kind", ["ddpm", "meanflow"])
def test_exact_resume_reproduces_the_uninterrupted_run(tmp_path, kind):
    store = _store(tmp_path / "demos.zarr", n_episodes=6)
    data = ChunkData(store, horizon=8, n_obs_steps=2, n_action_steps=4)
    norm = data.fit_normalizer()

    def make(out, resume=False):
        torch.manual_seed(0)
        policy = Policy(2, 2, 2, 8, 4, head={"kind": kind}, net=NET, normalizer=norm)
        # 8 batches per epoch: the run crosses epoch boundaries, the interruption falls mid-epoch
        return Trainer(policy, data, _cfg(steps=20, batch_size=16, ckpt_every=0), out, resume=resume)

    full = make(tmp_path / "full")
    full.fit()
    part = make(tmp_path / "part")
    assert part.batches_per_epoch < 13
    part.fit(until=13)
    torch.manual_seed(12345)  # the resumed process's global RNG must not matter
    resumed = make(tmp_path / "part", resume=True)
    assert resumed.step == 13
    resumed.fit()
    a = [h["loss"] for h in full.history[13:]]
    b = [h["loss"] for h in resumed.history]
    assert a == b  # bit-identical
    assert _losses_csv(tmp_path / "full" / "metrics.csv") == _losses_csv(tmp_path / "part" / "metrics.csv")
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_keep_last_k_and_final_policy_loads(tmp_path):
    store = _store(tmp_path / "demos.zarr", n_episodes=6)
    data = ChunkData(store, horizon=8, n_obs_steps=2, n_action_steps=4, episodes=[0, 1, 2, 3, 4])
    val = ChunkData(store, horizon=8, n_obs_steps=2, n_action_steps=4, episodes=[5])
    calls = []

    def eval_fn(policy, step):
        calls.append(step)
        assert isinstance(policy, Policy)
        return {"success_rate": 0.5}

    torch.manual_seed(0)
    policy = Policy(2, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=data.fit_normalizer())
    trainer = Trainer(policy, data, _cfg(steps=12, ckpt_every=3, keep_last=2, val_every=4, eval_every=6), tmp_path,
                      val_data=val, eval_fn=eval_fn)
    last = trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000009", "step_00000012"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"
    assert calls == [6, 12] and math.isfinite(last["val_loss"]) and last["eval/success_rate"] == 0.5
    with open(tmp_path / "val.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 6, 8, 12]
    assert [s for s, _ in _losses_csv(tmp_path / "metrics.csv")] == list(range(12))
    final = Policy.load(tmp_path)  # the EMA weights, not the live ones
    ema_sd, live = trainer.ema.model.state_dict(), trainer.policy.state_dict()
    assert all(torch.equal(final.state_dict()[k], ema_sd[k]) for k in ema_sd)
    assert any(not torch.equal(ema_sd[k], live[k]) for k in ema_sd)
    assert Policy.load(tmp_path / "checkpoints" / "step_00000012").state_dict().keys() == live.keys()


def test_batch_larger_than_the_data_is_refused(tmp_path):
    data = _bimodal_data()
    policy = Policy(3, 2, 2, 8, 4, net=NET)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        Trainer(policy, data, _cfg(batch_size=10_000), tmp_path)


def test_cli_train_then_eval_end_to_end(tmp_path, monkeypatch, capsys):
    from stlflow import cli

    monkeypatch.setenv("MUJOCO_GL", "egl")
    demos, out = tmp_path / "demos.zarr", tmp_path / "ckpt"
    assert cli.main(["collect", "env=crossing", "episodes=4", f"out={demos}"]) == 0
    rc = cli.main(["train", "env=crossing", "policy=flow", f"data={demos}", f"out={out}", "train=tiny",
                   "train.steps=20", "train.batch_size=32", "train.progress=false", "eval_episodes=0"])
    assert rc == 0
    policy = Policy.load(out)
    assert policy.head.kind == "flow" and policy.n_obs_steps == 2 and policy.horizon == 16
    assert policy.discrete_action_mask.shape == (policy.action_dim,)
    assert cli.main(["eval", f"ckpt={out}", "episodes=2", f"out={tmp_path / 'eval'}", "progress=false"]) == 0
    assert "success" in capsys.readouterr().out.lower()


def test_cli_distils_a_meanflow_policy_from_a_flow_checkpoint(tmp_path, monkeypatch, capsys):
    from stlflow import cli

    monkeypatch.setenv("MUJOCO_GL", "egl")
    demos = tmp_path / "demos.zarr"
    assert cli.main(["collect", "env=crossing", "episodes=3", f"out={demos}"]) == 0
    common = [f"data={demos}", "train=tiny", "train.steps=10", "train.batch_size=32", "train.progress=false",
              "eval_episodes=0"]
    assert cli.main(["train", "env=crossing", "policy=flow", f"out={tmp_path / 'flow'}", *common]) == 0
    assert cli.main(["train", "env=crossing", "policy=meanflow", f"out={tmp_path / 'mf'}", *common,
                     f"train.teacher={tmp_path / 'flow'}"]) == 0
    student, teacher = Policy.load(tmp_path / "mf"), Policy.load(tmp_path / "flow")
    assert student.head.kind == "meanflow"
    sa, sb = student.normalizer.state_dict(), teacher.normalizer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    capsys.readouterr()
    assert cli.main(["train", "env=crossing", "policy=ddpm", f"out={tmp_path / 'bad'}", *common,
                     f"train.teacher={tmp_path / 'flow'}"]) == 2
    assert "policy=meanflow" in capsys.readouterr().err


def test_cli_train_pickplace_with_a_scaled_gripper_channel(tmp_path, monkeypatch):
    """policy.discrete_scale reaches the saved policy, and the RTI controller's scale mode accepts it."""
    from stlflow import cli
    from stlflow.policy import RTIController

    monkeypatch.setenv("MUJOCO_GL", "egl")
    demos, out = tmp_path / "pp.zarr", tmp_path / "ckpt"
    assert cli.main(["collect", "env=pickplace", "episodes=2", f"out={demos}", "progress=false"]) == 0
    rc = cli.main(["train", "env=pickplace", "policy=flow", f"data={demos}", f"out={out}", "train=tiny",
                   "train.steps=5", "train.batch_size=16", "train.progress=false", "eval_episodes=0",
                   "policy.discrete_scale=4"])
    assert rc == 0
    policy = Policy.load(out)
    assert policy.discrete_scale == 4.0 and policy.discrete_action_mask.tolist() == [False, False, False, True]
    grip = policy.normalize_action(torch.tensor([[0.0, 0.0, 0.1, 1.0], [0.0, 0.0, 0.1, -1.0]]))[:, 3]
    assert grip.abs().max() <= 0.25 + 1e-6  # the gripper's ±1 sit at ±1/4 in the network's units
    ctrl = RTIController(policy, k=2, discrete_mode="scale")
    import gymnasium as gym

    env = gym.make("stlflow/PickPlace-v0")
    obs, _ = env.reset(seed=0)
    assert ctrl.act(obs)[3] in (-1.0, 1.0)


@pytest.mark.parametrize("kind,lr", [("flow", 3e-4), ("ddpm", 3e-4), ("meanflow", 1e-3)])
def test_unset_learning_rate_is_the_heads_own_and_is_what_the_run_records(tmp_path, kind, lr):
    data = _bimodal_data()
    policy = Policy(3, 2, 2, 8, 4, head={"kind": kind}, net=NET, normalizer=data.fit_normalizer())
    trainer = Trainer(policy, data, _cfg(lr=None, steps=12, warmup_steps=2, batch_size=16), tmp_path)
    assert trainer.cfg.lr == lr and trainer.opt.param_groups[0]["initial_lr"] == lr
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[2]["lr"]) == pytest.approx(lr * lr_lambda(2, 2, 12))  # the schedule runs from that peak
    assert Trainer(policy, data, _cfg(lr=5e-4, steps=12), tmp_path / "set").cfg.lr == 5e-4  # a set lr wins


def test_fused_adamw_makes_the_same_updates_as_the_per_tensor_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Mish(), torch.nn.Linear(32, 3))
    twin, start = copy.deepcopy(net), copy.deepcopy(net)
    cfg = _cfg(lr=1e-2)
    fused = adamw(net.parameters(), cfg)
    loop = torch.optim.AdamW(twin.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    assert fused.defaults.get("fused") is True and not loop.defaults.get("fused")
    for _ in range(20):
        x = torch.randn(64, 6)
        for model, opt in ((net, fused), (twin, loop)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    apart = max(float((a - b).abs().max()) for a, b in zip(net.parameters(), twin.parameters()))
    moved = min(float((a - b).abs().max()) for a, b in zip(net.parameters(), start.parameters()))
    assert apart < 1e-5 and moved > 1e-2  # both trained, to the same weights


# ---------------------------------------------------------------------------------------------- verified checkpoints
def _resumable(out, resume=False, **kw):
    data = _bimodal_data()
    torch.manual_seed(0)
    policy = Policy(3, 2, 2, 8, 4, head={"kind": "flow"}, net=NET, normalizer=data.fit_normalizer())
    cfg = _cfg(**{"steps": 12, "batch_size": 16, "ckpt_every": 3, "keep_last": 3, **kw})
    return Trainer(policy, data, cfg, out, resume=resume)


def test_checkpoints_record_the_sha256_of_all_their_files_and_leave_no_temporaries(tmp_path):
    import yaml

    from stlflow.policy.checkpoint import sha256_file

    trainer = _resumable(tmp_path)
    trainer.fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000009", "step_00000012"]
    for d in root.glob("step_*"):
        files = yaml.safe_load((d / "policy.yaml").read_text())["files"]
        assert set(files) == {"model.safetensors", "normalizer.safetensors", "ema.safetensors", "training_state.pt"}
        assert all(files[n]["sha256"] == sha256_file(d / n) for n in files)
        assert sorted(p.name for p in d.iterdir()) == sorted([*files, "policy.yaml"])
    final = yaml.safe_load((tmp_path / "policy.yaml").read_text())["files"]  # the final policy in out/
    assert final["model.safetensors"]["sha256"] == sha256_file(tmp_path / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:  # corrupted: same size, one byte changed
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "corrupted"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_when_the_latest_training_state_is_damaged(tmp_path, how):
    full = _resumable(tmp_path / "full")
    full.fit()
    part = _resumable(tmp_path / "part")
    part.fit(until=9)
    root = tmp_path / "part" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000009"
    _damage(root / "step_00000009" / "training_state.pt", how)
    torch.manual_seed(12345)
    with pytest.warns(RuntimeWarning, match=r"step_00000009 is not usable .*training_state.pt.*; resuming from the "
                                            r"newest intact checkpoint .*step_00000006 \(step 6\)"):
        resumed = _resumable(tmp_path / "part", resume=True)
    assert resumed.step == 6
    resumed.fit()  # and the run goes on exactly as the uninterrupted one from step 6
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[6:]]
    assert (root / "latest").read_text() == "step_00000012"
    assert Policy.load(root / "step_00000009")  # re-saved over the damaged one, verified


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_resume_falls_back_when_the_latest_pointer_is_missing_or_empty(tmp_path, how):
    _resumable(tmp_path).fit(until=9)
    latest = tmp_path / "checkpoints" / "latest"
    latest.unlink() if how == "missing" else latest.write_text("")
    with pytest.warns(RuntimeWarning, match=rf"latest is {how}.*resuming from the newest intact .*step_00000009"):
        resumed = _resumable(tmp_path, resume=True)
    assert resumed.step == 9


def test_resume_falls_back_past_a_latest_checkpoint_with_truncated_weights(tmp_path):
    _resumable(tmp_path).fit(until=9)
    _damage(tmp_path / "checkpoints" / "step_00000009" / "ema.safetensors", "truncated")
    with pytest.warns(RuntimeWarning, match=r"ema.safetensors is truncated.*step_00000006"):
        assert _resumable(tmp_path, resume=True).step == 6


def test_resume_refuses_when_no_kept_checkpoint_is_intact(tmp_path):
    from stlflow.policy import CheckpointError

    _resumable(tmp_path).fit(until=9)
    root = tmp_path / "checkpoints"
    for d, how in zip(sorted(root.glob("step_*")), ["missing", "empty", "truncated"]):
        _damage(d / "training_state.pt", how)
    with pytest.raises(CheckpointError, match=r"checkpoints: resume=True but no kept checkpoint is intact: .*"
                                              r"step_00000009.*training_state.pt is truncated.*step_00000003") as info:
        _resumable(tmp_path, resume=True)
    assert info.value.directory == root


def test_resume_from_a_checkpoint_written_before_content_hashes(tmp_path):
    import warnings

    import yaml

    _resumable(tmp_path).fit(until=9)
    d = tmp_path / "checkpoints" / "step_00000009"
    cfg = yaml.safe_load((d / "policy.yaml").read_text())
    del cfg["files"]
    cfg["format_version"] = 1
    (d / "policy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resumable(tmp_path, resume=True).step == 9


def _train_forever(out: str) -> None:
    """Subprocess body: train with a checkpoint every step until killed."""
    import sys

    trainer = _resumable(out, steps=100_000, ckpt_every=1, keep_last=2)
    print("ready", flush=True, file=sys.stdout)
    trainer.fit()


def test_a_kill_during_training_leaves_a_resumable_latest_checkpoint(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    import warnings
    from pathlib import Path

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_trainer import _train_forever; "
            f"_train_forever({str(tmp_path)!r})")
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            t0 = time.monotonic()
            while not (tmp_path / "checkpoints" / "latest").exists() and time.monotonic() - t0 < 60:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
            child.stdout.close()
        latest = (tmp_path / "checkpoints" / "latest").read_text()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback needed: the latest checkpoint is always complete
            resumed = _resumable(tmp_path, resume=True, steps=100_000, ckpt_every=1, keep_last=2)
        assert f"step_{resumed.step:08d}" == latest and resumed.step > 0
