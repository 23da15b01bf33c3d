"""The `stlflow` console script: help lists every verb; unwritten verbs fail loudly."""

from __future__ import annotations

import shutil
import subprocess
import sys

from stlflow import cli


def test_help_lists_every_verb(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in cli.VERBS:
        assert verb in out


def test_unknown_verb_exits_nonzero(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown verb" in capsys.readouterr().err


def test_console_script_installed():
    exe = shutil.which("stlflow") or str(__import__("pathlib").Path(sys.executable).with_name("stlflow"))
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "collect" in proc.stdout
