"""Demonstration collection: store layout, signal convention, determinism across worker counts, the CLI."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import stlflow.envs  # noqa: F401
from stlflow.control.collect import collect
from stlflow.control.jobs import CollectJob
from stlflow.datasets import EpisodeStore

ENV = "pickplace"  # the faster task; Crossing goes through the same code


def test_store_layout_and_signal_convention(tmp_path):
    store = collect(CollectJob(ENV, 3, tmp_path / "d.zarr", seed=5, progress=False))
    env = gym.make("stlflow/PickPlace-v0")
    u = env.unwrapped
    assert store.n_episodes == 3
    assert store.dt == pytest.approx(u.dt)
    assert store.attrs["env_id"] == "stlflow/PickPlace-v0"
    assert store.attrs["rules"] == u.rules
    assert store.attrs["rule_defaults"] == pytest.approx(u.rule_defaults)
    for i in range(3):
        ep, attrs = store.episode(i), store.episode_attrs(i)
        seed = 5 + i
        assert attrs["seed"] == seed and attrs["source"] == "expert" and attrs["env_id"] == "stlflow/PickPlace-v0"
        assert attrs["length"] == ep["obs"].shape[0] == ep["action"].shape[0]
        expert = u.make_expert(seed)
        assert attrs["mode"] == expert.mode
        assert set(attrs) >= {"style", "success", "collision"}
        # replay: obs[t] is what action[t] was chosen from; signal_<name>[t] is the state after action[t]
        obs, info = env.reset(seed=seed)
        expert.reset()
        for t in range(attrs["length"]):
            np.testing.assert_array_equal(ep["obs"][t], obs.astype(np.float32))
            a = expert.act(obs)
            np.testing.assert_array_equal(ep["action"][t], np.asarray(a, np.float32))
            obs, _, term, trunc, info = env.step(a)
            for name, value in info["signals"].items():
                assert ep[f"signal_{name}"][t] == np.float32(value)
        assert term or trunc
        assert attrs["success"] == bool(info["success"])


def test_same_store_for_any_worker_count(tmp_path):
    one = collect(CollectJob(ENV, 6, tmp_path / "w1.zarr", seed=11, workers=1, progress=False))
    two = collect(CollectJob(ENV, 6, tmp_path / "w2.zarr", seed=11, workers=2, progress=False))
    assert one.n_episodes == two.n_episodes == 6
    assert one.attrs == two.attrs
    for i in range(6):
        assert one.episode_attrs(i) == two.episode_attrs(i)
        a, b = one.episode(i), two.episode(i)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    assert [one.episode_attrs(i)["seed"] for i in range(6)] == list(range(11, 17))


def test_refuses_to_overwrite_and_cli(tmp_path, capsys):
    from stlflow.verbs.collect import main

    out = tmp_path / "cli.zarr"
    assert main(["env=pickplace", "episodes=2", f"out={out}", "seed=3", "progress=false"]) == 0
    assert EpisodeStore.open(out).n_episodes == 2
    assert main(["env=pickplace", "episodes=1", f"out={out}", "progress=false"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert EpisodeStore.open(out).n_episodes == 2  # untouched
    assert main(["env=pickplace", "episodes=1", f"out={out}", "overwrite=true", "progress=false"]) == 0
    store = EpisodeStore.open(out)
    assert store.n_episodes == 1 and store.episode_attrs(0)["seed"] == 0
    with pytest.raises(ValueError, match="episodes"):
        collect(CollectJob(ENV, 0, tmp_path / "x.zarr"))
