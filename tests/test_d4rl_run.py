"""The D4RL run harness (stlflow.control.d4rl_run): an end-to-end run writes metrics, checkpoints and a report;
resume keeps the metrics written; bad input fails before anything is written; locomotion on gymnasium's v4 env;
a task without reference scores reports raw returns."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from stlflow.control.d4rl_report import aggregate, read_metrics
from stlflow.control.d4rl_run import D4RLRunJob, eval_target, run

TINY = {"width": 32, "layers": 2, "critic_width": 32, "critic_layers": 2}


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()  # run() gives each seed one thread, in this process when workers=1
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def umaze(tmp_path_factory):
    from stlflow.control.d4rl_data import generate

    return generate("maze2d-umaze-v1", tmp_path_factory.mktemp("d4rl") / "umaze.hdf5", 3000, seed=0, progress=False)


def _job(data, out, **kw):
    base = {"task": "maze2d-umaze-v1", "agent": "ofql", "steps": 200, "eval_every": 100, "eval_episodes": 2,
            "seeds": (0,), "workers": 1, "batch_size": 64, "agent_settings": dict(TINY), "progress": False}
    return D4RLRunJob(data=str(data), out=str(out), **{**base, **kw})


def test_200_update_run_writes_report(umaze, tmp_path):
    out = tmp_path / "run"
    rep = run(_job(umaze, out))
    rows = read_metrics(out / "seed_0" / "metrics.csv")
    assert [r["step"] for r in rows] == [100, 200]
    assert all(r["score_mean"] is not None and 0 <= r["stl_satisfied"] <= 1 for r in rows)
    assert (out / "seed_0" / "checkpoint" / "model.safetensors").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["last"]["mean"] == pytest.approx(rows[-1]["score_mean"])
    assert saved["best"]["mean"] == pytest.approx(max(r["score_mean"] for r in rows))
    assert saved["env_id"] == "stlflow/Maze2d-umaze-v1" and saved["comparison"] == "exact"
    assert saved["anchors"]["IQL"] == pytest.approx(42.11) and rep["steps"] == [200]
    md = (out / "report.md").read_text()
    for text in ("last (mean ± std over seeds)", "best (mean ± std over seeds)", "IQL", "STL rule satisfaction",
                 "stlflow/Maze2d-umaze-v1", "exact", "ms per update"):
        assert text in md


def test_resume_keeps_metrics_and_redoes_a_row_past_the_checkpoint(umaze, tmp_path):
    out = tmp_path / "run"
    run(_job(umaze, out, steps=100, eval_every=50))
    metrics = out / "seed_0" / "metrics.csv"
    before = read_metrics(metrics)
    assert [r["step"] for r in before] == [50, 100]
    # a run killed after writing its step-150 row but before its step-150 checkpoint
    with open(metrics, "a") as f:
        f.write("150" + ",0" * (len(before[0]) - 1) + "\n")
    with pytest.raises(FileExistsError, match="resume=true"):
        run(_job(umaze, out, steps=200, eval_every=50))
    run(_job(umaze, out, steps=200, eval_every=50, resume=True))
    after = read_metrics(metrics)
    assert [r["step"] for r in after] == [50, 100, 150, 200]
    assert after[:2] == before
    assert after[2]["return_mean"] is not None and after[2]["train_s"] > before[1]["train_s"]
    with pytest.raises(ValueError, match="agent='bc-flow'"):
        run(_job(umaze, out, agent="bc-flow", agent_settings={}, resume=True))


def test_bad_input_leaves_nothing(umaze, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(_job(tmp_path / "missing.hdf5", out))
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(umaze.read_bytes()[: umaze.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated"):
        run(_job(truncated, out))
    with pytest.raises(ValueError, match="unknown task 'maze2d-tiny-v1'; known tasks: .*maze2d-umaze-v1.*hopper"):
        run(_job(umaze, out, task="maze2d-tiny-v1"))
    with pytest.raises(ValueError, match="has 11 and 3"):
        run(_job(umaze, out, task="hopper-medium-v2"))
    with pytest.raises(ValueError, match="unknown agent"):
        run(_job(umaze, out, agent="cql"))
    with pytest.raises(ValueError, match="unknown settings"):
        run(_job(umaze, out, agent_settings={"etta": 1}))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run(_job(umaze, out, steps=0))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.hdf5"]


def _hopper_file(path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        f["rewards"] = rng.uniform(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = (np.arange(n) % 100) == 99
    return path


def test_locomotion_on_gymnasium_v4_is_approximate(tmp_path):
    data = _hopper_file(tmp_path / "hopper.hdf5")
    rep = run(_job(data, tmp_path / "run", task="hopper-medium-v2", agent="td3bc", steps=20, eval_every=20,
                   agent_settings={"width": 32}))
    assert rep["env_id"] == "Hopper-v4" and rep["comparison"] == "approximate"
    assert rep["metric"] == "D4RL normalised score" and rep["anchors"]["TD3+BC"] == pytest.approx(60.37)
    assert eval_target("hopper-medium-v2", env_version="v5").env_id == "Hopper-v5"
    assert "changes the reward" in eval_target("walker2d-medium-v2", env_version="v5").note
    with pytest.raises(ValueError, match="env_version"):
        eval_target("hopper-medium-v2", env_version="v3")


def test_task_without_reference_scores_reports_raw_returns(tmp_path):
    data = _hopper_file(tmp_path / "hopper.hdf5")
    with pytest.warns(UserWarning, match="no D4RL reference scores for task 'my-hopper'"):
        rep = run(_job(data, tmp_path / "run", task="my-hopper", env="Hopper-v4", agent="td3bc", steps=10,
                       eval_every=10, agent_settings={"width": 32}))
    assert rep["metric"].startswith("raw return") and rep["comparison"] == "none"
    rows = read_metrics(tmp_path / "run" / "seed_0" / "metrics.csv")
    assert rows[-1]["score_mean"] is None and rep["last"]["mean"] == pytest.approx(rows[-1]["return_mean"])
    assert "raw returns" in (tmp_path / "run" / "report.md").read_text()


def test_aggregate_last_and_best_over_seeds():
    rows = {0: [{"step": 1, "score_mean": 10.0}, {"step": 2, "score_mean": 30.0}, {"step": 3, "score_mean": 20.0}],
            1: [{"step": 1, "score_mean": 40.0}, {"step": 2, "score_mean": 0.0}, {"step": 3, "score_mean": 40.0}]}
    agg = aggregate(rows, scored=True)
    assert agg["last"] == {"mean": 30.0, "std": 10.0, "n": 2}
    assert agg["best"] == {"mean": 35.0, "std": 5.0, "n": 2}


@pytest.mark.slow
def test_killed_run_resumes_keeping_metrics(umaze, tmp_path):
    """A real SIGKILL of `stlflow d4rl run` after its first rows, then resume=true."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "stlflow", "d4rl", "run", "task=maze2d-umaze-v1", f"data={umaze}", f"out={out}",
            "steps=100000", "eval_every=20", "eval_episodes=1", "seeds=[0]", "workers=1", "batch_size=32",
            "progress=false", *(f"agent.{k}={v}" for k, v in TINY.items())]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "seed_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(read_metrics(metrics)) < 2):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_metrics(metrics)
    assert len(before) >= 2
    last = int((out / "seed_0" / "checkpoint" / "policy.yaml").read_text().split("steps: ")[1].split()[0])
    done = subprocess.run([*args[:10], f"steps={last + 40}", *args[11:], "resume=true"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    after = read_metrics(metrics)
    kept = [r for r in before if r["step"] <= last]
    assert after[: len(kept)] == kept and after[-1]["step"] == last + 40
    assert (out / "report.json").is_file()
