"""Checkpoints: atomic writes, sha256-verified loads, one CheckpointError per kind of damage, SIGKILL mid-save."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from stlflow.datasets import Normalizer
from stlflow.policy import CheckpointError, Policy
from stlflow.policy.checkpoint import MissingCheckpointError, sha256_file

torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "data" / "golden"
TINY_NET = {"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}
BIG_NET = {"name": "mlp", "width": 512, "n_blocks": 4, "time_embed_dim": 64}  # ~4M parameters, ~17 MB


def _policy(net=None, seed=0, kind="flow") -> Policy:
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"obs": rng.normal(size=(100, 3)), "action": rng.uniform(-2, 2, (100, 2))})
    torch.manual_seed(seed)
    policy = Policy(3, 2, 2, 8, 4, head={"kind": kind}, net=net or TINY_NET, normalizer=norm)
    with torch.no_grad():  # away from the initialisation, so that two seeds give clearly different weights
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy


def _same(a: Policy, b: Policy) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config() == b.config() and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def _yaml(d: Path) -> dict:
    return yaml.safe_load((d / "policy.yaml").read_text())


def _write_yaml(d: Path, cfg) -> None:
    (d / "policy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    _policy().save(d)
    return d


# ---------------------------------------------------------------------------------------------- writing
def test_policy_yaml_records_the_sha256_of_every_file_and_load_verifies_it(ckpt):
    files = _yaml(ckpt)["files"]
    assert set(files) == {"model.safetensors", "normalizer.safetensors"}
    for name, entry in files.items():
        assert entry == {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    assert _same(Policy.load(ckpt), _policy())
    assert _hidden(ckpt) == [] and _hidden(ckpt.parent) == []  # no temporary folder or file left


def test_save_replaces_an_existing_checkpoint_and_keeps_other_files_of_the_folder(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.csv").write_text("step,loss\n0,1.0\n")  # a folder holding other things (a training run's out/)
    (d / "checkpoints").mkdir()
    a, b = _policy(seed=0), _policy(BIG_NET, seed=1)
    a.save(d)
    assert _same(Policy.load(d), a)
    b.save(d)
    assert _same(Policy.load(d), b)
    assert (d / "metrics.csv").read_text() == "step,loss\n0,1.0\n" and (d / "checkpoints").is_dir()
    assert sorted(p.name for p in d.iterdir()) == ["checkpoints", "metrics.csv", "model.safetensors",
                                                    "normalizer.safetensors", "policy.yaml"]
    assert "path" not in str(_yaml(d)["files"])  # at rest the files sit at their canonical names


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_save(ckpt):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (ckpt / f".stage-{pid}-00ff").mkdir()
    (ckpt / f".stage-{pid}-00ff" / "model.safetensors").write_bytes(b"partial")
    (ckpt / f".policy.yaml.tmp-{pid}-0a0b").write_text("half")
    (ckpt.parent / f".ckpt.tmp-{pid}-0c0d").mkdir()
    (ckpt / ".keep-me").write_text("not ours")
    _policy(seed=3).save(ckpt)
    assert _hidden(ckpt) == [".keep-me"] and _hidden(ckpt.parent) == []
    assert _same(Policy.load(ckpt), _policy(seed=3))


def test_a_checkpoint_caught_between_the_two_policy_yaml_swaps_loads_from_its_staging_folder(ckpt):
    # The state a writer killed after the first swap leaves: policy.yaml names staged copies, the canonical names
    # still hold the old files.
    old = _policy(seed=0)
    new = _policy(seed=5)
    staged = ckpt.parent / "staged"
    new.save(staged)
    stage = ckpt / ".stage-1-abcdef"
    stage.mkdir()
    for name in ("model.safetensors", "normalizer.safetensors"):
        shutil.copy(staged / name, stage / name)
    cfg = _yaml(staged)
    cfg["files"] = {n: {**e, "path": f"{stage.name}/{n}"} for n, e in cfg["files"].items()}
    _write_yaml(ckpt, cfg)
    assert sha256_file(ckpt / "model.safetensors") != cfg["files"]["model.safetensors"]["sha256"]  # still A there
    assert _same(Policy.load(ckpt), new) and not _same(Policy.load(ckpt), old)


def test_checkpoints_written_before_content_hashes_still_load(tmp_path):
    for kind in ("ddpm", "flow", "meanflow"):
        cfg = _yaml(GOLDEN / kind)
        assert cfg["format_version"] == 1 and "files" not in cfg  # the committed golden checkpoints: no hashes
        assert Policy.load(GOLDEN / kind).head.kind == kind
    legacy = tmp_path / "legacy"
    _policy(seed=2).save(legacy)
    cfg = _yaml(legacy)
    del cfg["files"]
    cfg["format_version"] = 1
    _write_yaml(legacy, cfg)
    assert _same(Policy.load(legacy), _policy(seed=2))


# ---------------------------------------------------------------------------------------------- errors
def _raises(d: Path, match: str, cls=CheckpointError) -> CheckpointError:
    with pytest.raises(cls, match=match) as info:
        Policy.load(d)
    err = info.value
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError)
    assert err.directory == d and str(d) in str(err)  # names the folder ...
    return err


def test_missing_folder(tmp_path):
    err = _raises(tmp_path / "nothing", "the folder does not exist", MissingCheckpointError)
    assert isinstance(err, FileNotFoundError)


def test_missing_policy_yaml(ckpt):
    (ckpt / "policy.yaml").unlink()
    assert isinstance(_raises(ckpt, "policy.yaml is missing"), FileNotFoundError)


@pytest.mark.parametrize("name", ["model.safetensors", "normalizer.safetensors"])
def test_missing_tensor_file(ckpt, name):
    (ckpt / name).unlink()
    assert isinstance(_raises(ckpt, f"{name} is missing"), FileNotFoundError)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    _raises(ckpt, rf"model.safetensors is truncated: {len(data) // 2} bytes, policy.yaml says {len(data)}")


def test_empty_safetensors(ckpt):
    (ckpt / "normalizer.safetensors").write_bytes(b"")
    _raises(ckpt, "normalizer.safetensors is empty: 0 bytes")


def test_garbage_safetensors(ckpt):
    size = (ckpt / "model.safetensors").stat().st_size
    (ckpt / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(size))  # the right size, noise
    _raises(ckpt, "model.safetensors is corrupted: its sha256 .* differs")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_safetensors_without_hashes_is_refused_when_parsed(ckpt, damage):
    cfg = _yaml(ckpt)
    del cfg["files"]
    cfg["format_version"] = 1
    _write_yaml(ckpt, cfg)
    data = (ckpt / "model.safetensors").read_bytes()
    bad = {"truncated": data[: len(data) - 100], "empty": b"",
           "garbage": np.random.default_rng(1).bytes(len(data))}[damage]
    (ckpt / "model.safetensors").write_bytes(bad)
    _raises(ckpt, "model.safetensors cannot be read")


def test_empty_yaml(ckpt):
    (ckpt / "policy.yaml").write_text("")
    _raises(ckpt, "policy.yaml is empty")


def test_invalid_yaml(ckpt):
    (ckpt / "policy.yaml").write_text("obs_dim: [3\nhorizon: : 8\n")
    _raises(ckpt, "policy.yaml is not valid YAML")


def test_list_yaml(ckpt):
    (ckpt / "policy.yaml").write_text("- obs_dim\n- 3\n")
    _raises(ckpt, "policy.yaml must be a mapping of settings, got a list")


def test_unknown_config_key(ckpt):
    cfg = _yaml(ckpt)
    cfg["temperature"] = 0.5
    _write_yaml(ckpt, cfg)
    _raises(ckpt, r"unknown settings \['temperature'\], missing settings \[\]")


def test_missing_config_key(ckpt):
    cfg = _yaml(ckpt)
    del cfg["obs_dim"]
    _write_yaml(ckpt, cfg)
    _raises(ckpt, r"unknown settings \[\], missing settings \['obs_dim'\]")


def test_invalid_config_value(ckpt):
    cfg = _yaml(ckpt)
    cfg["head"]["kind"] = "gan"
    _write_yaml(ckpt, cfg)
    _raises(ckpt, "does not describe a valid policy: unknown head kind 'gan'")


@pytest.mark.parametrize("key,value,match", [
    ("horizon", 12, r"model.safetensors does not match policy.yaml: .*shapes \[.*in the file"),
    ("obs_dim", 4, "normalizer.safetensors has 3 obs features, policy.yaml says 4"),
    ("action_dim", 3, "does not describe a valid policy: discrete_action_mask must have shape"),
])
def test_edited_dimensions_that_disagree_with_the_weights(ckpt, key, value, match):
    cfg = _yaml(ckpt)
    cfg[key] = value
    _write_yaml(ckpt, cfg)
    _raises(ckpt, match)


def test_edited_network_width_disagrees_with_the_weights(ckpt):
    cfg = _yaml(ckpt)
    cfg["net"]["width"] = 48
    _write_yaml(ckpt, cfg)
    _raises(ckpt, "model.safetensors does not match policy.yaml")


def _flip_weights(path: Path, value: float) -> str:
    """Overwrite every value of the largest float tensor of a safetensors file in place (same size, same header)."""
    sd = load_file(str(path))
    key = max((k for k, v in sd.items() if v.is_floating_point()), key=lambda k: sd[k].numel())
    sd[key] = torch.full_like(sd[key], value)
    tmp = path.with_name("rewritten")
    save_file(sd, str(tmp), metadata={"format": "stlflow.Policy"})
    assert tmp.stat().st_size == path.stat().st_size
    os.replace(tmp, path)
    return key


def test_hash_mismatch_is_refused(ckpt):
    _flip_weights(ckpt / "model.safetensors", 0.5)  # finite, well-formed, the right shapes: only the hash tells
    _raises(ckpt, "model.safetensors is corrupted: its sha256")


def test_corrupted_weights_that_would_predict_nan_are_refused(ckpt):
    key = _flip_weights(ckpt / "model.safetensors", float("nan"))
    # the file itself is well formed: without the check the policy would load and predict NaN
    unchecked = _policy()
    unchecked.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    assert np.isnan(unchecked.predict(np.zeros((1, 2, 3)))).all()
    _raises(ckpt, "model.safetensors is corrupted: its sha256")
    cfg = _yaml(ckpt)  # and a checkpoint without hashes is refused on the non-finite values
    del cfg["files"]
    cfg["format_version"] = 1
    _write_yaml(ckpt, cfg)
    _raises(ckpt, rf"non-finite values \(NaN or inf\) in \['{key}'\]")


def test_a_current_checkpoint_stripped_of_its_hashes_is_refused(ckpt):
    cfg = _yaml(ckpt)
    del cfg["files"]
    _write_yaml(ckpt, cfg)
    _raises(ckpt, r"format_version 2\) lacks the 'files' content hashes")


def test_unsupported_format_version(ckpt):
    cfg = _yaml(ckpt)
    cfg["format_version"] = 7
    _write_yaml(ckpt, cfg)
    _raises(ckpt, "unsupported format_version 7")


@pytest.mark.parametrize("entry,match", [
    ({"sha256": "abc", "bytes": 10}, "malformed 'files' entry for 'model.safetensors'"),
    ({"sha256": "0" * 64, "bytes": 10, "path": "../elsewhere/model.safetensors"}, "points outside the checkpoint"),
])
def test_malformed_files_section(ckpt, entry, match):
    cfg = _yaml(ckpt)
    cfg["files"]["model.safetensors"] = entry
    _write_yaml(ckpt, cfg)
    _raises(ckpt, match)


# ---------------------------------------------------------------------------------------------- SIGKILL mid-save
def _save_forever(src: str, path: str, fresh_root: str) -> None:
    """Subprocess body: load policy B from ``src`` and save it over ``path`` and to new folders, until killed."""
    torch.set_num_threads(1)
    policy = Policy.load(src)
    print("ready", flush=True)
    i = 0
    while True:
        policy.save(path)
        policy.save(Path(fresh_root) / f"fresh_{i}")
        i += 1


def test_a_kill_during_save_leaves_the_previous_or_the_new_checkpoint(tmp_path):
    a, b = _policy(seed=0), _policy(BIG_NET, seed=1)
    b.save(tmp_path / "b_src")
    path, fresh_root = tmp_path / "ckpt", tmp_path / "fresh"
    fresh_root.mkdir()
    rng = random.Random(0)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_checkpoint import _save_forever; "
            f"_save_forever({str(tmp_path / 'b_src')!r}, {str(path)!r}, {str(fresh_root)!r})")
    seen, interrupted = [], 0
    for k in range(6):
        a.save(path)  # checkpoint A (also clears the previous round's leftovers)
        assert _hidden(path) == [] and _same(Policy.load(path), a)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            # even rounds: inside the first save of B (A must survive), odd rounds: anywhere in the loop
            time.sleep(rng.uniform(0.0, 0.04) if k % 2 == 0 else rng.uniform(0.05, 0.5))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        interrupted += bool(_hidden(path) or _hidden(fresh_root) or _hidden(tmp_path))
        loaded = Policy.load(path)  # verified; never an error
        assert _same(loaded, a) or _same(loaded, b)
        seen.append("A" if _same(loaded, a) else "B")
        for d in fresh_root.glob("fresh_*"):  # a new folder is either absent or complete
            assert _same(Policy.load(d), b)
    assert interrupted > 0, "no kill landed inside a save: the test did not test anything"
    print("after each kill:", seen)


def _alternate_forever(src_a: str, src_b: str, path: str) -> None:
    """Subprocess body: save A and B over ``path`` in turn, until killed."""
    torch.set_num_threads(1)
    a, b = Policy.load(src_a), Policy.load(src_b)
    print("ready", flush=True)
    while True:
        for policy in (a, b):
            policy.save(path)
            time.sleep(0.05)


def test_loads_that_overlap_saves_by_another_process_read_one_whole_checkpoint(tmp_path):
    # Same network, different weights and normalisers: a load mixing the two checkpoints' files would go unnoticed
    # by the shapes; every load must be all A or all B.
    a, b = _policy(BIG_NET, seed=0), _policy(BIG_NET, seed=1)
    b.normalizer = Normalizer.fit({"obs": np.random.default_rng(1).normal(size=(100, 3)) * 3,
                                   "action": np.random.default_rng(2).uniform(-5, 5, (100, 2))})
    a.save(tmp_path / "a_src")
    b.save(tmp_path / "b_src")
    path = tmp_path / "ckpt"
    a.save(path)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_checkpoint import _alternate_forever; "
            f"_alternate_forever({str(tmp_path / 'a_src')!r}, {str(tmp_path / 'b_src')!r}, {str(path)!r})")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        assert child.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and not (time.monotonic() - t0 > 3 and len(seen) >= 4 and 0 < sum(seen)
                                                   < len(seen)):
            loaded = Policy.load(path)
            want = a if _same(loaded, a) else b
            assert _same(loaded, want)
            ns, nw = loaded.normalizer.state_dict(), want.normalizer.state_dict()
            assert all(torch.equal(ns[k], nw[k]) for k in nw)
            seen.append(want is b)
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert len(seen) >= 4 and 0 < sum(seen) < len(seen), seen  # both checkpoints were read
