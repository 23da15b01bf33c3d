"""`stlflow train` on bad input: one message naming the input, exit status 2, no traceback, nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from stlflow.datasets import EpisodeStore
from stlflow.verbs.train import main

CROSSING_OBS, CROSSING_ACT = 20, 2


def _store(path, episodes):
    store = EpisodeStore.create(str(path), dt=0.1, attrs={"env_id": "stlflow/Crossing-v0"})
    for ep in episodes:
        store.add_episode(ep)
    return path


def _episode(obs_dim=CROSSING_OBS, nan_at=None, steps=30):
    obs = np.zeros((steps, obs_dim), np.float32)
    if nan_at is not None:
        obs[nan_at] = np.nan
    return {"obs": obs, "action": np.zeros((steps, CROSSING_ACT), np.float32)}


CASES = {
    "plain directory": (lambda p: (p.mkdir(), p)[1], "is not an EpisodeStore"),
    "a file": (lambda p: (p.write_text("hello"), p)[1], "is not an EpisodeStore"),
    "a plain zarr group": (lambda p: (zarr.open_group(str(p), mode="w"), p)[1], "is not an EpisodeStore"),
    "missing": (lambda p: p, "does not exist"),
    "no episodes": (lambda p: _store(p, []), "holds no episodes"),
    "no action": (lambda p: _store(p, [{"obs": np.zeros((30, CROSSING_OBS), np.float32)}]), "no ['action'] arrays"),
    "NaN observation": (lambda p: _store(p, [_episode(), _episode(nan_at=(7, 3))]),
                        "episode 1 has a non-finite obs value at step 7"),
    "obs of another task": (lambda p: _store(p, [_episode(obs_dim=7)]), "obs has 7 values per step but crossing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_is_refused_and_leaves_nothing(case, tmp_path, capsys):
    make, message = CASES[case]
    data = make(tmp_path / "data.zarr")
    out = tmp_path / "out"
    assert main([f"data={data}", f"out={out}", "train.steps=5", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stlflow train: ") and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_non_integer_steps_are_refused(tmp_path, capsys):
    data = _store(tmp_path / "d.zarr", [_episode(steps=60)] * 2)
    assert main([f"data={data}", f"out={tmp_path / 'out'}", "train.steps=2.5"]) == 2
    assert "train.steps must be an integer, got 2.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_too_few_windows_for_the_batch_is_refused_without_output(tmp_path, capsys):
    """Too few windows for the batch: the trainer refuses before it writes anything."""
    data = _store(tmp_path / "d.zarr", [_episode(steps=20)])
    assert main([f"data={data}", f"out={tmp_path / 'out'}", "train.steps=5", "train.batch_size=4096"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("STLFLOW_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main([f"data={tmp_path / 'missing.zarr'}", f"out={tmp_path / 'out'}"])


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_training_interrupted_before_its_first_checkpoint_leaves_no_output(tmp_path):
    """SIGINT once training has started (the output folder exists, no checkpoint yet): the folder is removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _store(tmp_path / "d.zarr", [_episode(steps=60)] * 4)
    out = tmp_path / "out"
    log_path = tmp_path / "train.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "stlflow", "train", f"data={data}", f"out={out}",
                             "train.steps=1000000", "train.ckpt_every=1000000", "train.val_every=0",
                             "train.batch_size=16", "train.progress=false", "train.tensorboard=false",
                             "eval_episodes=0"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},  # a file, not a pipe: nobody reads it
                            # an inherited SIG_IGN or blocked SIGINT (a shell without job control, a library thread
                            # of an earlier test) would make the child deaf to it: give it what a terminal gives
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), log_path.read_text() if proc.poll() is not None else "no output folder within 120 s"
        time.sleep(0.5)  # training steps are running
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("stlflow train did not stop within 120 s of SIGINT; its output:\n"
                        + log_path.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode != 0, log_path.read_text()
    assert not out.exists()
