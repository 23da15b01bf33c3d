"""`stlflow stl check` on CSV and NPZ files: once through the installed entry point, then in-process.

Exit status 0 satisfied, 1 violated, 2 bad input (one paragraph naming the input and the fix, no traceback),
3 internal error (with its traceback); property tests feed it damaged files and odd arguments: never a crash.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- bad input: exit 2, one paragraph


def _in_process(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `stlflow stl check ARGS`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", *args])
    return code, out.getvalue(), err.getvalue()


def _write(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD_CSV = "x,y\n0.1,1\n0.5,0.5\n"
BAD_INPUT_CASES = [
    # (id, file name, file content or None (no file), formula, extra args, words the message must contain)
    ("csv-header-and-blank-lines", "s.csv", "x,y\n\n\n  \n", "x < 1", [],
     ["s.csv", "no row of samples follows", "add one row"]),
    ("csv-empty", "s.csv", "", "x < 1", [], ["s.csv", "empty"]),
    ("csv-ragged-row", "s.csv", "x,y\n1,2\n3\n", "x < 1", [], ["s.csv, line 3", "1 value(s) for 2 columns"]),
    ("csv-not-a-number", "s.csv", "x\n1\nfast\n", "x < 1", [], ["s.csv, line 3, column 'x'", "'fast' is not a number"]),
    ("csv-duplicate-column", "s.csv", "x,y,x\n1,2,3\n", "x < 1", [],
     ["s.csv", "column 'x' appears twice", "columns 1 and 3", "distinct name"]),
    ("csv-unnamed-column", "s.csv", "x,,y\n1,2,3\n", "x < 1", [], ["s.csv", "column 2 of the header has no name"]),
    ("csv-not-utf8", "s.csv", b"x\n1\n\xff\xfe2\n", "x < 1", [], ["s.csv", "not UTF-8", "0xff", "save the CSV"]),
    ("npz-not-zip", "s.npz", b"not a zip archive", "x < 1", [], ["s.npz", "not an .npz archive", "numpy.savez"]),
    ("npz-truncated", "s.npz", _npz_bytes(x=np.arange(50.0))[:200], "x < 1", [], ["s.npz", "not an .npz archive"]),
    ("npz-object-array", "s.npz", _npz_bytes(x=np.array([1, "a"], dtype=object)), "x < 1", [],
     ["s.npz", "array 'x' holds Python objects"]),
    ("npz-strings", "s.npz", _npz_bytes(x=np.array(["a", "b"])), "x < 1", [], ["s.npz", "array 'x' has dtype <U1"]),
    ("missing-file", None, None, "x < 1", [], ["s.csv", "does not exist", "check the path"]),
    ("unsupported-suffix", "s.txt", GOOD_CSV, "x < 1", [], ["s.txt", "unsupported file type '.txt'"]),
    ("dt-zero", "s.csv", GOOD_CSV, "G[0,1](x < 1)", ["--dt", "0"], ["--dt 0", "positive, finite number of seconds"]),
    ("dt-negative", "s.csv", GOOD_CSV, "G[0,1](x < 1)", ["--dt", "-0.1"], ["--dt -0.1", "positive"]),
    ("dt-nan", "s.csv", GOOD_CSV, "x < 1", ["--dt", "nan"], ["--dt nan", "positive"]),
    ("dt-inf", "s.csv", GOOD_CSV, "x < 1", ["--dt", "inf"], ["--dt inf", "positive"]),
    ("huge-interval", "s.csv", GOOD_CSV, "G[0,1e300](x < 1)", ["--dt", "1e-300"],
     ["--signals", "interval bound 1e+300", "too large for dt=1e-300", "larger dt"]),
    ("malformed-formula", "s.csv", GOOD_CSV, "G[0,2](x < ", [], ["formula: syntax error", "column 12", "^"]),
    ("missing-signal", "s.csv", GOOD_CSV, "G(speed < 1)", [], ["missing signal(s) ['speed']", "['x', 'y']"]),
    ("missing-parameter", "s.csv", GOOD_CSV, "x < {v_max}", [], ["missing parameter(s) ['v_max']", "--param"]),
    ("parameter-twice", "s.csv", GOOD_CSV, "x < {v}", ["--param", "v=1", "--param", "v=2"], ["--param v", "twice"]),
    ("bound-not-multiple-of-dt", "s.csv", GOOD_CSV, "G[0,0.25](x < 1)", ["--dt", "0.1"],
     ["not an integer multiple of dt=0.1"]),
    ("interval-parameter-negative", "s.csv", GOOD_CSV, "G[0,{T}](x < 1)", ["--param", "T=-1"],
     ["interval bound -1.0", ">= 0"]),
]


@pytest.mark.parametrize("name, content, formula, extra, words", [c[1:] for c in BAD_INPUT_CASES],
                         ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_input_exits_2_with_one_paragraph_naming_it(tmp_path, monkeypatch, name, content, formula, extra, words):
    monkeypatch.delenv("STLFLOW_DEBUG", raising=False)
    path = tmp_path / (name or "s.csv")
    if content is not None:
        _write(path, content)
    args = [formula, "--signals", str(path), *(extra if "--dt" in extra else ["--dt", "1", *extra])]
    code, out, err = _in_process(*args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and out == ""
    assert err.startswith("stlflow stl check: ") and "\n\n" not in err.strip()  # one paragraph
    for w in words:
        assert w in err, (w, err)


def test_debug_flag_and_environment_show_the_traceback_of_bad_input(tmp_path, monkeypatch):
    path = _write(tmp_path / "s.csv", "x,x\n1,2\n")
    monkeypatch.delenv("STLFLOW_DEBUG", raising=False)
    code, _, err = _in_process("x < 1", "--signals", str(path), "--dt", "1", "--debug")
    assert code == 2 and "Traceback" in err and "column 'x' appears twice" in err
    monkeypatch.setenv("STLFLOW_DEBUG", "1")
    code, _, err = _in_process("x < 1", "--signals", str(path), "--dt", "1")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("give every column a distinct name")


def test_internal_error_keeps_its_traceback_and_never_looks_like_a_verdict(tmp_path, monkeypatch):
    import stlflow.verbs.stl as verb

    def broken(path):
        raise IndexError("a bug")

    monkeypatch.setattr(verb, "_load_signals", broken)
    code, out, err = _in_process("x < 1", "--signals", str(tmp_path / "s.csv"), "--dt", "1")
    assert code not in (0, 1, 2) and code == 3
    assert "Traceback" in err and "IndexError: a bug" in err and "internal error" in err and out == ""


def test_bad_input_exit_status_through_the_entry_point(tmp_path):
    path = _write(tmp_path / "s.csv", "x\n\n\n")
    out = _run("x < 1", "--signals", str(path), "--dt", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "no row of samples" in out.stderr


# --------------------------------------------------------------------------- properties: never a crash

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
CELLS = st.one_of(st.sampled_from(["0", "1.5", "-2", "nan", "inf", "", " ", "x", "1e400", "0x1", "1_0"]),
                  st.text(alphabet="0123456789.-e ", max_size=5))
FORMULAS = st.sampled_from(["x < 1", "G[0,1](x < {c})", "F[0,{T}](y > 0) & x < 2", "(x < 1) U[0,2] (y > 0)",
                            "H[1,2](abs(x - y) < {c})", "G(x < 1", "x << 1", "G[0,1e300](x < 1)"])
DTS = st.sampled_from(["1", "0.5", "0", "-1", "nan", "inf", "1e-300", "1e300", "0.3"])
PARAMS = st.lists(st.sampled_from(["c=1", "T=1", "T=0.5", "c=-inf", "T=-1", "T=inf", "c=1e308", "q=2"]), max_size=3)


def _check_outcome(code: int, out: str, err: str) -> None:
    assert code in (0, 1, 2), (code, out, err)  # never an internal error
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("stlflow stl check: ") or err.startswith("usage:"), err
    else:
        assert out.startswith("formula: ") and ("violated" in out) == (code == 1), out


@FUZZ
@given(st.lists(st.sampled_from(["x", "y", "z", "", " x"]), min_size=0, max_size=3),
       st.lists(st.lists(CELLS, max_size=4), max_size=5), FORMULAS, DTS, PARAMS)
def test_check_never_crashes_on_csv_input(tmp_path_factory, header, rows, formula, dt, params):
    path = tmp_path_factory.mktemp("csv") / "s.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    args = [formula, "--signals", str(path), "--dt", dt]
    for p in params:
        args += ["--param", p]
    _check_outcome(*_in_process(*args))


@FUZZ
@given(st.binary(max_size=64), st.booleans())
def test_check_never_crashes_on_arbitrary_csv_bytes(tmp_path_factory, data, with_header):
    path = tmp_path_factory.mktemp("bytes") / "s.csv"
    path.write_bytes((b"x,y\n" if with_header else b"") + data)
    _check_outcome(*_in_process("G[0,1](x < 1) | y > 0", "--signals", str(path), "--dt", "1"))


@FUZZ
@given(st.data())
def test_check_never_crashes_on_a_damaged_npz(tmp_path_factory, data):
    good = _npz_bytes(x=np.linspace(0.0, 2.0, 12).reshape(2, 6), y=np.arange(6))
    how = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    blob = bytearray(good)
    if how in ("flip", "both"):
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    if how in ("truncate", "both"):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    path.write_bytes(bytes(blob))
    _check_outcome(*_in_process("G[0,2](x < 1.5) & y >= 0", "--signals", str(path), "--dt", "1"))
