"""`stlflow d4rl` on the command line: help, refs, score, generate and run, and bad input as exit status 2 with
nothing left behind."""

import json

import pytest
import torch

from stlflow.cli import main
from stlflow.datasets.d4rl_refs import REF_SCORES


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_help_explains_every_subcommand_and_key(capsys):
    assert main(["d4rl", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("generate", "run", "refs", "score", "resume=true", "agent.KEY=VALUE", "max_minutes", "env_version",
                 "last", "best", "exact", "approximate"):
        assert word in text, word
    for key in ("task:", "data:", "out:", "agent:", "steps:", "eval_every:", "eval_episodes:", "seeds:", "workers:",
                "samples:", "seed:", "return:"):
        assert key in text, key
    assert main(["d4rl", "run", "--help"]) == 0
    assert main(["d4rl"]) == 2
    assert main(["d4rl", "train"]) == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err


def test_refs_and_score(capsys):
    assert main(["d4rl", "refs"]) == 0
    text = capsys.readouterr().out
    lo, hi = REF_SCORES["maze2d-umaze-v1"]
    assert "maze2d-umaze-v1" in text and f"{hi:.2f}" in text and "42.1" in text  # CORL's IQL beside it
    assert main(["d4rl", "score", "task=maze2d-umaze-v1", f"return={hi}"]) == 0
    assert "normalised score 100.00" in capsys.readouterr().out
    assert main(["d4rl", "score", "task=maze2d-umaze-v1", f"return=[{lo},{hi}]"]) == 0
    assert "0.00, 100.00 (mean 50.00" in capsys.readouterr().out
    assert main(["d4rl", "score", "task=maze2d-tiny-v1", "return=3"]) == 2
    err = capsys.readouterr().err
    assert "no D4RL reference scores for task 'maze2d-tiny-v1'; known tasks:" in err and "maze2d-large-v1" in err
    assert main(["d4rl", "score", "task=maze2d-umaze-v1"]) == 2
    assert "return= is required" in capsys.readouterr().err


def test_generate_then_run(tmp_path, capsys):
    data = tmp_path / "umaze.hdf5"
    assert main(["d4rl", "generate", "task=maze2d-umaze-v1", f"out={data}", "samples=2000", "progress=false"]) == 0
    assert data.is_file()
    assert main(["d4rl", "generate", "task=maze2d-umaze-v1", f"out={data}", "samples=2000"]) == 2
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "run"
    args = ["d4rl", "run", "task=maze2d-umaze-v1", f"data={data}", f"out={out}", "agent=bc-flow", "steps=20",
            "eval_every=10", "eval_episodes=1", "seeds=[3]", "workers=1", "batch_size=32", "progress=false",
            "agent.width=32", "agent.layers=2"]
    assert main(args) == 0
    assert "bc-flow (ours)" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["seeds"] == [3] and rep["agent_settings"] == {"width": 32, "layers": 2} and rep["steps"] == [20]


def test_run_bad_input_exit_2_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["d4rl", "run", f"out={out}", "steps=10", "progress=false"]
    assert main([*base, "task=maze2d-umaze-v1", f"data={tmp_path / 'none.hdf5'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    assert main([*base, "task=maze2d-umaze-v1", f"data={bad}"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main([*base, "task=antmaze-umaze-v2", f"data={bad}"]) == 2
    assert "unknown task 'antmaze-umaze-v2'; known tasks: " in capsys.readouterr().err
    assert main([*base, "task=maze2d-umaze-v1"]) == 2
    assert "data= is required" in capsys.readouterr().err
    assert main([*base, "task=maze2d-umaze-v1", f"data={bad}", "agent=sac"]) == 2
    assert "unknown agent 'sac'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "nonsense_key=1"])
    assert exit_.value.code == 2 and "Could not override 'nonsense_key'" in capsys.readouterr().err
    assert not out.exists()
