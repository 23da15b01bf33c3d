"""stlflow stl: STL tools on recorded signals.

  stlflow stl check "FORMULA" --signals FILE.{csv,npz} --dt 0.1 [--param v_max=1.0 ...] [--debug]

Prints ρ (robustness at sample 0) per trajectory, the verdict (satisfied: ρ ≥ 0), and for a violation the
earliest sub-formula and time at which it is violated. A CSV file (UTF-8) has a header row of distinct signal
names and one row per sample (one trajectory); an NPZ file holds one array of numbers per signal, shaped (T,)
or (B, T).

Exit status: 0 if every trajectory satisfies the formula; 1 if one violates it (ρ < 0, or ρ NaN from a NaN or
infinite sample it reads); 2 on bad input (one paragraph on stderr naming the input and the fix); 3 on an
internal error (a bug: the traceback is printed). --debug or STLFLOW_DEBUG=1 adds the traceback to bad input.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import traceback
import zipfile
from pathlib import Path

import numpy as np

EXIT_SATISFIED, EXIT_VIOLATED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
PROG = "stlflow stl check"


class BadInput(Exception):
    """Input the user can fix: the message names the input and the fix (exit status 2, no traceback)."""


def _load_csv(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as err:
        raise BadInput(f"--signals {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start});"
                       " save the CSV file as UTF-8") from None
    except csv.Error as err:
        raise BadInput(f"--signals {path}: not a readable CSV file ({err}); write a header row of signal names and "
                       "one row of comma-separated numbers per sample") from None
    numbered = [(i + 1, row) for i, row in enumerate(rows) if any(cell.strip() for cell in row)]  # blank lines out
    if not numbered:
        raise BadInput(f"--signals {path}: the file is empty; write a header row of signal names and one row of "
                       "samples per line")
    (_, header), samples = numbered[0], numbered[1:]
    header = [h.strip() for h in header]
    for i, name in enumerate(header):
        if not name:
            raise BadInput(f"--signals {path}: column {i + 1} of the header has no name; name every column (and "
                           "drop trailing commas)")
        if name in header[:i]:
            raise BadInput(f"--signals {path}: column {name!r} appears twice in the header (columns "
                           f"{header.index(name) + 1} and {i + 1}); give every column a distinct name")
    if not samples:
        raise BadInput(f"--signals {path}: the header names the signals {header} but no row of samples follows; "
                       "add one row of numbers per sample")
    table = np.empty((len(samples), len(header)), dtype=np.float64)
    for r, (line, row) in enumerate(samples):
        if len(row) != len(header):
            raise BadInput(f"--signals {path}, line {line}: {len(row)} value(s) for {len(header)} columns "
                           f"{header}; write one value per column")
        for c, cell in enumerate(row):
            try:
                table[r, c] = float(cell)
            except ValueError:
                raise BadInput(f"--signals {path}, line {line}, column {header[c]!r}: {cell.strip()!r} is not a "
                               "number; every sample must be a number (nan and inf are allowed)") from None
    return {name: table[:, i] for i, name in enumerate(header)}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "write it with numpy.savez(path, name=array, ...)"
    if not zipfile.is_zipfile(path):
        raise BadInput(f"--signals {path}: not an .npz archive (not a zip file, or truncated); {fix}")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            for member in members:
                name = member.removesuffix(".npy")
                if not member.endswith(".npy"):
                    raise BadInput(f"--signals {path}: member {member!r} of the archive is not a .npy array; {fix}")
                if members.count(member) > 1:
                    raise BadInput(f"--signals {path}: the archive holds array {name!r} more than once; {fix}")
                with zf.open(member) as fh:
                    try:
                        a = np.lib.format.read_array(fh, allow_pickle=False)
                    except ValueError as err:
                        if "pickle" not in str(err):
                            raise
                        raise BadInput(f"--signals {path}: array {name!r} holds Python objects, not numbers; store "
                                       f"numeric arrays ({fix})") from None
                if a.dtype.kind not in "biuf":
                    raise BadInput(f"--signals {path}: array {name!r} has dtype {a.dtype}, not real numbers; store "
                                   "numeric arrays")
                out[name] = np.asarray(a, dtype=np.float64)
    except (FileNotFoundError, PermissionError, IsADirectoryError, BadInput):
        raise
    except Exception as err:  # whatever the zip or .npy reader meets in a damaged file (CRC, zlib, header, EOF...)
        raise BadInput(f"--signals {path}: damaged .npz archive ({type(err).__name__}: {err}); {fix}") from None
    if not out:
        raise BadInput(f"--signals {path}: the archive holds no arrays; {fix}")
    return out


def _load_signals(path: Path) -> dict[str, np.ndarray]:
    """Signal name -> float64 array, from a CSV or NPZ file; :class:`BadInput` names the file and the fix."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npz"):
        raise BadInput(f"--signals {path}: unsupported file type {path.suffix!r}; use a .csv or .npz file")
    try:
        if not path.exists():
            raise BadInput(f"--signals {path}: the file does not exist; check the path")
        if not path.is_file():
            raise BadInput(f"--signals {path}: not a file; give the path of a .csv or .npz file")
        return _load_csv(path) if suffix == ".csv" else _load_npz(path)
    except OSError as err:  # permission denied, I/O error, ...
        raise BadInput(f"--signals {path}: cannot be read ({err.strerror or err}); check the file and its "
                       "permissions") from None


def _parse_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--param expects NAME=NUMBER, got {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError(f"--param {text!r}: the value must be a number, not NaN")
    return name.strip(), v


def _params(pairs: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in pairs:
        if name in out:
            raise BadInput(f"--param {name} is given twice ({out[name]:g} and {value:g}); give each parameter once")
        out[name] = value
    return out


def _check(args: argparse.Namespace) -> int:
    from stlflow.stl import STLInputError, STLSyntaxError, first_violation, parse

    try:
        spec = parse(args.formula)
    except STLSyntaxError as err:
        raise BadInput(f"formula: syntax error: {err}") from err
    if not (math.isfinite(args.dt) and args.dt > 0):
        raise BadInput(f"--dt {args.dt:g}: the sample period must be a positive, finite number of seconds, e.g. "
                       "--dt 0.1")
    params = _params(args.param)
    missing = sorted(spec.params - set(params))
    if missing:
        raise BadInput(f"formula: missing parameter(s) {missing}; give each with --param NAME=NUMBER, e.g. "
                       f"--param {missing[0]}=1.0")
    signals = _load_signals(Path(args.signals))
    missing = sorted(spec.signals - set(signals))
    if missing:
        raise BadInput(f"--signals {args.signals}: missing signal(s) {missing} read by the formula; the file has "
                       f"{sorted(signals)}: add a column (CSV) or an array (NPZ) for each, or fix the formula")
    opts = {"until": args.until, "end": args.end}
    try:
        rho = spec.robustness(signals, args.dt, params, **opts).numpy()
    except STLInputError as err:
        raise BadInput(f"cannot evaluate the formula on --signals {args.signals} with --dt {args.dt:g}: {err}") from err
    print(f"formula: {spec}")
    bad = 0
    for b, r in enumerate(rho):
        label = f"trajectory {b}: " if len(rho) > 1 else ""
        verdict = ("satisfied" if r >= 0 else "violated" if r < 0
                   else "violated: rho is NaN, from a NaN or infinite sample")
        print(f"{label}rho = {r:.6g}  ({verdict})")
        if not r >= 0:
            bad += 1
            found = first_violation(spec, signals, args.dt, params, batch=b, **opts)
            if found is not None:
                node, t, value = found
                print(f"  earliest violation: {node}  at t = {t * args.dt:.6g} s (sample {t}), rho = {value:.6g}")
    return EXIT_VIOLATED if bad else EXIT_SATISFIED


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(args is not None and args.debug) or os.environ.get("STLFLOW_DEBUG", "") not in ("", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stlflow stl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="robustness, verdict and earliest violation of a formula on signals",
                           epilog="exit status: 0 satisfied, 1 violated, 2 bad input, 3 internal error (a bug)")
    check.add_argument("formula", help='STL text, e.g. "G[0,5](speed <= {v_max})"')
    check.add_argument("--signals", required=True, help="CSV (header of names) or NPZ file of signals")
    check.add_argument("--dt", type=float, required=True, help="sample period in seconds")
    check.add_argument("--param", type=_parse_param, action="append", default=[], metavar="NAME=VALUE",
                       help="value of a {parameter}; repeat for several")
    check.add_argument("--until", choices=["strict", "inclusive"], default="strict", help="Until variant")
    check.add_argument("--end", choices=["truncate", "violate"], default="truncate", help="end-of-signal policy")
    check.add_argument("--debug", action="store_true", help="print the traceback of an error (also STLFLOW_DEBUG=1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help, 2 on a usage error
        return int(exc.code or 0)
    try:
        return _check(args)
    except BadInput as err:
        if _debug(args):
            traceback.print_exc()
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away: the command line dispatcher exits quietly
        raise
    except Exception:  # a bug: never a verdict, never "bad input"
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug, not a verdict on the formula); please report it with the traceback "
              "above", file=sys.stderr)
        return EXIT_INTERNAL
