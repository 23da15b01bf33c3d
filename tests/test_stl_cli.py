"""`stlflow stl check` on CSV and NPZ files: once through the installed entry point, then in-process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from stlflow.verbs.stl import main


def _run(*args: str):
    return subprocess.run([sys.executable, "-m", "stlflow", "stl", "check", *args], capture_output=True, text=True,
                          timeout=120)


def test_check_csv_reports_rho_verdict_and_earliest_violation(tmp_path):
    path = tmp_path / "sig.csv"
    path.write_text("speed,dist_goal\n0.1,1\n0.5,0.5\n1.5,0.2\n0.2,0.05\n")
    out = _run("G(speed <= {v_max}) & F[0,0.3](dist_goal <= 0.1)", "--signals", str(path), "--dt", "0.1",
               "--param", "v_max=1.0")
    assert out.returncode == 1, out.stderr
    assert "rho = -0.5  (violated)" in out.stdout
    assert "earliest violation: speed <= {v_max}  at t = 0.2 s (sample 2), rho = -0.5" in out.stdout
    assert main(["check", "G(speed <= {v_max})", "--signals", str(path), "--dt", "0.1", "--param", "v_max=2"]) == 0


def test_check_npz_batch_and_errors(tmp_path, capsys):
    path = tmp_path / "sig.npz"
    np.savez(path, x=np.array([[0.0, 0.5, 2.0], [0.0, 0.1, 0.2]]))

    def run(*args):
        code = main(["check", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run("G[0,2](x < 1)", "--signals", str(path), "--dt", "1")
    assert code == 1
    assert "trajectory 0: rho = -1  (violated)" in out and "trajectory 1: rho = 0.8  (satisfied)" in out
    code, _, err = run("G[0,2](x < ", "--signals", str(path), "--dt", "1")
    assert code == 2 and "syntax error" in err and "^" in err
    code, _, err = run("G(y < 1)", "--signals", str(path), "--dt", "1")
    assert code == 2 and "missing signal(s) ['y']" in err and "['x']" in err
    code, _, err = run("G[0,0.25](x < 1)", "--signals", str(path), "--dt", "0.1")
    assert code == 2 and "not an integer multiple of dt=0.1" in err
    code, _, err = run("x < 1", "--signals", str(tmp_path / "none.csv"), "--dt", "1")
    assert code == 2 and "does not exist" in err
