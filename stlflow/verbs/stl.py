"""stlflow stl: STL tools on recorded signals.

  stlflow stl check "FORMULA" --signals FILE.{csv,npz} --dt 0.1 [--param v_max=1.0 ...]

Prints ρ (robustness at sample 0) per trajectory, the verdict (satisfied: ρ ≥ 0), and for a violation the
earliest sub-formula and time at which it is violated. A CSV file has a header row of signal names and one
row per sample (one trajectory); an NPZ file holds one array per signal, shaped (T,) or (B, T).
Exit status: 0 if every trajectory satisfies the formula, 1 if one violates it, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def _load_signals(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"signals file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: np.asarray(data[k], dtype=np.float64) for k in data.files}
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if len(rows) < 2:
            raise ValueError(f"{path}: expected a header row of signal names and at least one row of samples")
        header = [h.strip() for h in rows[0]]
        try:
            table = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"{path}: every sample must be a number ({err})") from None
        if table.shape[1] != len(header):
            raise ValueError(f"{path}: {len(header)} column names but {table.shape[1]} values per row")
        return {name: table[:, i] for i, name in enumerate(header)}
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .npz")


def _parse_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--param expects NAME=NUMBER, got {text!r}") from None


def _check(args: argparse.Namespace) -> int:
    from stlflow.stl import STLInputError, STLSyntaxError, first_violation, parse

    try:
        spec = parse(args.formula)
    except STLSyntaxError as err:
        print(f"stlflow stl check: syntax error: {err}", file=sys.stderr)
        return 2
    try:
        signals = _load_signals(Path(args.signals))
        params = dict(args.param)
        opts = {"until": args.until, "end": args.end}
        rho = spec.robustness(signals, args.dt, params, **opts).numpy()
    except (OSError, ValueError, STLInputError) as err:
        print(f"stlflow stl check: {err}", file=sys.stderr)
        return 2
    print(f"formula: {spec}")
    bad = 0
    for b, r in enumerate(rho):
        label = f"trajectory {b}: " if len(rho) > 1 else ""
        verdict = "satisfied" if r >= 0 else "violated"
        print(f"{label}rho = {r:.6g}  ({verdict})")
        if not r >= 0:
            bad += 1
            found = first_violation(spec, signals, args.dt, params, batch=b, **opts)
            if found is not None:
                node, t, value = found
                print(f"  earliest violation: {node}  at t = {t * args.dt:.6g} s (sample {t}), rho = {value:.6g}")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stlflow stl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="robustness, verdict and earliest violation of a formula on signals")
    check.add_argument("formula", help='STL text, e.g. "G[0,5](speed <= {v_max})"')
    check.add_argument("--signals", required=True, help="CSV (header of names) or NPZ file of signals")
    check.add_argument("--dt", type=float, required=True, help="sample period in seconds")
    check.add_argument("--param", type=_parse_param, action="append", default=[], metavar="NAME=VALUE",
                       help="value of a {parameter}; repeat for several")
    check.add_argument("--until", choices=["strict", "inclusive"], default="strict", help="Until variant")
    check.add_argument("--end", choices=["truncate", "violate"], default="truncate", help="end-of-signal policy")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return _check(args)
