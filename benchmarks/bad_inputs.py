"""Bad input, as a new user would give it: every case gets a named error and leaves nothing behind.

    python benchmarks/bad_inputs.py [--only SUBSTRING] [--keep DIR]

Each case builds its input in a fresh folder, runs one command (the real ``stlflow`` CLI in a subprocess) or
one Python call, and records: the exit status (or the exception type), the first line of the message, whether
a traceback was printed, and the files the run left behind besides its inputs. A row passes ("ok") when the
error is named (exit status 2, or a ``ValueError``-family exception of the package, with no traceback), the
STL ``check`` verdict codes 0/1 are never given for bad input, and nothing is left behind. Prints one Markdown
table and the count of rows that pass; exits 1 if any row fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CROSSING_OBS, CROSSING_ACT = 20, 2


@dataclass
class Case:
    """``make(folder) -> argv or callable``: the input built in ``folder``; argv runs ``stlflow`` in a subprocess,
    a callable runs in this process."""

    name: str
    make: Callable[[Path], list[str] | Callable[[], object]]


# ---------------------------------------------------------------------------------------------- inputs
def store(path: Path, episodes: list[dict], task: str = "crossing") -> Path:
    from stlflow.control.tasks import get_task
    from stlflow.datasets import EpisodeStore

    s = EpisodeStore.create(str(path), dt=0.1, attrs={"env_id": get_task(task).env_id})
    for ep in episodes:
        s.add_episode(ep)
    return path


def episode(obs_dim: int = CROSSING_OBS, steps: int = 30, nan_at: tuple | None = None) -> dict:
    obs = np.zeros((steps, obs_dim), np.float32)
    if nan_at is not None:
        obs[nan_at] = np.nan
    return {"obs": obs, "action": np.zeros((steps, CROSSING_ACT), np.float32)}


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def d4rl_file(path: Path, **overrides) -> Path:
    import h5py

    n = 20
    arrays = {"observations": np.zeros((n, 3), np.float32), "actions": np.zeros((n, 2), np.float32),
              "rewards": np.zeros(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    arrays["timeouts"][-1] = True
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if k == "metadata/name":
                f.attrs["name"] = v
                f.create_dataset(k, data=np.void(v))
            else:
                f.create_dataset(k, data=v)
    return path


def policy_dir(path: Path) -> Path:
    from stlflow.datasets import Normalizer
    from stlflow.policy import Policy

    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"obs": rng.normal(size=(50, 4)), "action": rng.normal(size=(50, 2))})
    Policy(4, 2, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow", "default_steps": 2},
           net={"name": "mlp", "width": 16, "n_blocks": 1, "time_embed_dim": 8}, normalizer=norm).save(path)
    return path


def corrupt(path: Path, name: str, how: str) -> Path:
    f = path / name
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(len(data)),
                   "flip": data[:-8] + bytes(8)}[how])
    return path


def load_policy(path: Path) -> Callable[[], object]:
    def call() -> object:
        from stlflow.policy import Policy

        return Policy.load(path)

    return call


def robustness_call(**kw) -> Callable[[], object]:
    def call() -> object:
        import torch

        from stlflow.stl import parse

        sig = kw.pop("signals", {"x": torch.linspace(0, 1, 20)[None]})
        return parse(kw.pop("formula", "G[0,1](x <= {c})")).robustness(sig, **{"dt": 0.1, "params": {"c": 2.0},
                                                                               **kw})

    return call


def monitor_missing_signal() -> object:
    from stlflow.stl import parse

    mon = parse("G(x <= 1)").monitor(dt=0.1)
    return mon.update({"y": 0.5})


STL = ["stl", "check", "G[0,1](x <= {c})", "--param", "c=2"]


def cases() -> list[Case]:
    train = ["train", "train.steps=5", "train.progress=false"]
    return [
        # stlflow stl check
        Case("stl check: CSV of a header and blank lines",
             lambda d: [*STL, "--signals", str(write(d / "s.csv", "x\n\n\n")), "--dt", "0.1"]),
        Case("stl check: truncated .npz", lambda d: [*STL, "--signals", str(
            write(d / "s.npz", _npz_bytes()[:40])), "--dt", "0.1"]),
        Case("stl check: non-zip .npz", lambda d: [*STL, "--signals", str(write(d / "s.npz", "not a zip")),
                                                    "--dt", "0.1"]),
        Case("stl check: --dt 0", lambda d: [*STL, "--signals", str(write(d / "s.csv", "x\n0\n1\n")), "--dt", "0"]),
        Case("stl check: huge interval", lambda d: ["stl", "check", "G[0,1e300](x <= 1)", "--signals",
                                                    str(write(d / "s.csv", "x\n0\n1\n")), "--dt", "1e-300"]),
        Case("stl check: duplicated column", lambda d: [*STL, "--signals", str(write(d / "s.csv", "x,x\n0,1\n1,2\n")),
                                                        "--dt", "0.1"]),
        Case("stl check: non-UTF-8 CSV", lambda d: [*STL, "--signals", str(write(d / "s.csv", b"x\n\xff\xfe\n")),
                                                    "--dt", "0.1"]),
        Case("stl check: malformed formula", lambda d: ["stl", "check", "G[0,5 (x < 1)", "--signals",
                                                        str(write(d / "s.csv", "x\n0\n")), "--dt", "0.1"]),
        # STL API
        Case("robustness: dt=0", lambda d: robustness_call(dt=0.0)),
        Case("robustness: dt=nan", lambda d: robustness_call(dt=float("nan"))),
        Case("robustness: smooth=inf", lambda d: robustness_call(smooth=float("inf"))),
        Case("robustness: parameter as a string", lambda d: robustness_call(params={"c": "high"})),
        Case("robustness: parameter None", lambda d: robustness_call(params={"c": None})),
        Case("monitor: missing signal", lambda d: monitor_missing_signal),
        # stlflow train
        Case("train: a plain directory", lambda d: [*train, f"data={(d / 'dir').mkdir() or d / 'dir'}",
                                                    f"out={d / 'out'}"]),
        Case("train: a file", lambda d: [*train, f"data={write(d / 'f.zarr', 'x')}", f"out={d / 'out'}"]),
        Case("train: a plain zarr", lambda d: [*train, f"data={_plain_zarr(d / 'p.zarr')}", f"out={d / 'out'}"]),
        Case("train: store without action", lambda d: [*train, f"data={store(d / 's.zarr', [{'obs': np.zeros((30, 20), np.float32)}])}", f"out={d / 'out'}"]),  # noqa: E501
        Case("train: store with no episodes", lambda d: [*train, f"data={store(d / 's.zarr', [])}",
                                                         f"out={d / 'out'}"]),
        Case("train: NaN observation", lambda d: [*train, f"data={store(d / 's.zarr', [episode(nan_at=(3, 1))])}",
                                                  f"out={d / 'out'}"]),
        Case("train: non-integer train.steps", lambda d: ["train", "train.steps=2.5",
                                                          f"data={store(d / 's.zarr', [episode()])}",
                                                          f"out={d / 'out'}"]),
        Case("train: observation size of another task", lambda d: [*train, f"data={store(d / 's.zarr', [episode(obs_dim=7)])}", f"out={d / 'out'}"]),  # noqa: E501
        # stlflow data
        Case("data import d4rl: scalar rewards", lambda d: ["data", "import", "d4rl", str(
            d4rl_file(d / "x.hdf5", rewards=np.float32(1.0))), str(d / "out.zarr")]),
        Case("data import d4rl: NaN in float terminals", lambda d: ["data", "import", "d4rl", str(
            d4rl_file(d / "x.hdf5", terminals=np.array([0.0] * 9 + [np.nan] + [0.0] * 10, np.float32))),
            str(d / "out.zarr")]),
        Case("data info: not a store", lambda d: ["data", "info", str(write(d / "x.zarr", "x"))]),
        Case("data info: episode_ends not increasing", lambda d: ["data", "info", str(_edit_ends(
            store(d / "s.zarr", [episode(steps=12), episode(steps=30)]), [12, 10]))]),
        Case("data info: Diffusion Policy store with float episode_ends", lambda d: ["data", "info", str(
            _dp_store(d / "dp.zarr", np.array([10.0, 20.5])))]),
        Case("train resume=true: every kept training state truncated", lambda d: [
            "train", "resume=true", "train.progress=false", "train.steps=4", "train.batch_size=16",
            f"data={store(d / 's.zarr', [episode(steps=60)] * 3)}", f"out={_damaged_run(d)}"]),
        # checkpoints
        Case("Policy.load: truncated weights", lambda d: load_policy(corrupt(policy_dir(d / "p"), "model.safetensors",
                                                                             "truncate"))),
        Case("Policy.load: empty weights", lambda d: load_policy(corrupt(policy_dir(d / "p"), "model.safetensors",
                                                                         "empty"))),
        Case("Policy.load: garbage weights", lambda d: load_policy(corrupt(policy_dir(d / "p"), "model.safetensors",
                                                                           "garbage"))),
        Case("Policy.load: flipped weight bytes", lambda d: load_policy(corrupt(policy_dir(d / "p"),
                                                                                "model.safetensors", "flip"))),
        Case("Policy.load: empty policy.yaml", lambda d: load_policy(corrupt(policy_dir(d / "p"), "policy.yaml",
                                                                             "empty"))),
        Case("Policy.load: list YAML", lambda d: load_policy(_yaml(policy_dir(d / "p"), "- 1\n- 2\n"))),
        Case("Policy.load: missing folder", lambda d: load_policy(d / "nothing")),
    ]


def _npz_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(10))
    return buf.getvalue()


def _plain_zarr(path: Path) -> Path:
    import zarr

    zarr.open_group(str(path), mode="w")
    return path


def _edit_ends(path: Path, ends: list[int]) -> Path:
    import zarr

    zarr.open_group(str(path), mode="r+")["meta"]["episode_ends"][:] = ends
    return path


def _dp_store(path: Path, ends: np.ndarray) -> Path:
    import zarr

    root = zarr.open_group(str(path), mode="w")
    root.create_group("data").create_array("obs", data=np.zeros((21, 3), np.float32))
    root.create_group("meta").create_array("episode_ends", data=ends)
    return path


def _damaged_run(folder: Path) -> Path:
    """A finished tiny training run whose kept training states are all truncated."""
    data = store(folder / "run.zarr", [episode(steps=60)] * 3)
    out = folder / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "stlflow", "train", f"data={data}", f"out={out}", "train.steps=4",
                    "train.ckpt_every=2", "train.batch_size=16", "train.progress=false", "train.tensorboard=false",
                    "eval_episodes=0"], check=True, capture_output=True, env=env)
    for state in out.glob("checkpoints/step_*/training_state.pt"):
        state.write_bytes(state.read_bytes()[:100])
    return out


def _yaml(path: Path, text: str) -> Path:
    (path / "policy.yaml").write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- running
def run_case(case: Case, folder: Path) -> dict:
    target = case.make(folder)
    before = {p for p in folder.rglob("*")}
    row = {"case": case.name}
    if callable(target):
        try:
            target()
            row.update(status="returned", message="(no error)", traceback=False, named=False)
        except ValueError as err:  # the package's error classes are ValueError subclasses
            row.update(status=type(err).__name__, message=str(err).splitlines()[0], traceback=False, named=True)
        except Exception as err:  # noqa: BLE001 - an unexpected type is the finding
            row.update(status=type(err).__name__, message=str(err).splitlines()[0] if str(err) else "",
                       traceback=True, named=False, detail=traceback.format_exc())
    else:
        env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "stlflow", *target], capture_output=True, text=True,
                              cwd=folder, env=env, timeout=300)
        err = [line for line in proc.stderr.strip().splitlines() if "it/s]" not in line]  # not progress bars
        said = [line for line in err if line.startswith("stlflow")] or err
        row.update(status=f"exit {proc.returncode}", message=(said[0] if said else proc.stdout.strip()[:120]),
                   traceback="Traceback" in proc.stderr, named=proc.returncode == 2)
    row["message"] = row["message"].replace(str(folder), "<case>")  # the table names inputs, not temp folders
    left = sorted(str(p.relative_to(folder)) for p in set(folder.rglob("*")) - before)
    row["left"] = ", ".join(left) if left else "-"
    row["ok"] = bool(row["named"] and not row["traceback"] and not left)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--keep", default=None, help="build the inputs under this folder and keep them")
    args = ap.parse_args()
    rows = []
    root = Path(args.keep or tempfile.mkdtemp(prefix="stlflow_bad_inputs_"))
    for i, case in enumerate(c for c in cases() if args.only is None or args.only in c.name):
        folder = root / f"case{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows.append(run_case(case, folder))
        print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} {case.name}: {rows[-1]['status']}: {rows[-1]['message']}",
              file=sys.stderr, flush=True)
    print("| input | exit status / exception | first line of the message | traceback | left behind | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        msg = r["message"].replace("|", "\\|")[:160]
        print(f"| {r['case']} | {r['status']} | {msg} | {'yes' if r['traceback'] else 'no'} | {r['left']} | "
              f"{'ok' if r['ok'] else 'FAIL'} |")
    passed = sum(r["ok"] for r in rows)
    print(f"\n{passed} of {len(rows)} cases give a named error and leave nothing behind")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
