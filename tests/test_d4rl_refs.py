"""D4RL reference scores (package data), the normalised score, and per-task Q-learning settings."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from stlflow.datasets.d4rl_refs import (
    REF_SCORES,
    d4rl_task_settings,
    known_tasks,
    normalized_score,
    reference_scores,
)
from stlflow.datasets.importers import qlearning_dataset

CHECKED = {  # D4RL's published (random, expert) returns
    "maze2d-umaze-v1": (23.85, 161.86),
    "maze2d-medium-v1": (13.13, 277.39),
    "maze2d-large-v1": (6.7, 273.99),
    "maze2d-umaze-dense-v1": (68.537689, 193.66285642381482),
    "maze2d-medium-dense-v1": (44.264742, 297.4552547777125),
    "maze2d-large-dense-v1": (30.569041, 303.4857382709002),
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}


def test_package_data_is_installed():
    text = resources.files("stlflow.datasets").joinpath("data/d4rl_refs.json").read_text()
    assert json.loads(text)["scores"]["maze2d-umaze-v1"] == [23.85, 161.86]


@pytest.mark.parametrize("task", [k for k in CHECKED if k.startswith("maze2d")])
def test_maze2d_references(task):
    assert reference_scores(task) == CHECKED[task]


@pytest.mark.parametrize("robot", ["hopper", "halfcheetah", "walker2d"])
def test_locomotion_references_shared_by_every_dataset_and_version(robot):
    for version in ("v0", "v1", "v2"):
        for dataset in ("random", "medium", "expert", "medium-replay", "medium-expert"):
            assert reference_scores(f"{robot}-{dataset}-{version}") == CHECKED[robot]
    assert reference_scores(f"{robot}-full-replay-v2") == CHECKED[robot]
    assert reference_scores(f"{robot}-full-replay-v0") is None  # D4RL has no v0 full-replay
    assert reference_scores(f"{robot}-medium-v3") is None


def test_normalized_score():
    assert normalized_score("maze2d-umaze-v1", 23.85) == 0.0
    assert normalized_score("maze2d-umaze-v1", 161.86) == pytest.approx(100.0)
    assert isinstance(normalized_score("hopper-medium-v2", 1000.0), float)
    score = normalized_score("walker2d-medium-expert-v2", np.array([[1.629008, 4592.3]]))
    assert score.shape == (1, 2)
    np.testing.assert_allclose(score, [[0.0, 100.0]])
    assert normalized_score("halfcheetah-medium-v2", 5927.410524) == pytest.approx(50.0)
    assert normalized_score("antmaze-umaze-v2", 0.75) == 75.0


def test_unknown_task_warns_and_returns_none_or_raises_when_strict():
    with pytest.warns(UserWarning, match="no D4RL reference scores for task 'pointmaze-umaze-v3'.*maze2d-umaze-v1"):
        assert normalized_score("pointmaze-umaze-v3", [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="known tasks: .*hopper-medium-v2"):
        normalized_score("maze2d-open-v0", 1.0, strict=True)


def test_known_tasks_and_mapping_is_read_only():
    tasks = known_tasks()
    assert tasks == sorted(REF_SCORES) and "maze2d-large-dense-v1" in tasks
    assert all(lo < hi for lo, hi in REF_SCORES.values())
    with pytest.raises(TypeError):
        REF_SCORES["x"] = (0.0, 1.0)  # type: ignore[index]


def test_task_settings():
    assert d4rl_task_settings("maze2d-umaze-v1") == {"ignore_terminals": True}
    assert d4rl_task_settings("maze2d-large-dense-v1") == {"ignore_terminals": True}
    assert d4rl_task_settings("hopper-medium-v2") == {}


def test_qlearning_dataset_ignore_terminals():
    n = 10
    data = {
        "observations": np.arange(n, dtype=np.float32)[:, None],
        "actions": np.zeros((n, 2), np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        "terminals": np.arange(n) == 4,
        "timeouts": np.arange(n) == 7,
    }
    plain = qlearning_dataset(data)
    assert plain["terminals"].tolist().count(True) == 1  # D4RL's semantics unchanged by default
    q = qlearning_dataset(data, **d4rl_task_settings("maze2d-umaze-v1"))
    assert not q["terminals"].any() and len(q["rewards"]) == n - 2  # step 7 (timeout) and the last dropped
    i = q["observations"][:, 0].tolist().index(4.0)
    assert q["next_observations"][i, 0] == 5.0  # through the former terminal, the stream goes on
