"""The ``stlflow`` command line: a thin dispatcher from a verb to its module.

Each verb lives in ``stlflow/verbs/<verb>.py`` and exposes ``main(argv: list[str]) -> int``.
Verbs that drive a job take Hydra overrides (``stlflow train env=crossing policy=flow``) and
compose their configuration from the groups in ``stlflow.conf`` (see :mod:`stlflow.config`);
tool verbs (``data``, ``stl``) take ordinary flags. A verb whose module is not written yet
says so and exits non-zero: there is no pretend success.
"""

from __future__ import annotations

import importlib
import sys

# verb -> one-line description, in the order of the data flow (docs/architecture.md).
VERBS: dict[str, str] = {
    "collect": "run a task's scripted expert and record demonstrations into an EpisodeStore",
    "calibrate": "fit the STL rules' free parameters on demonstrations (per episode and dataset-wide)",
    "augment": "make diverse rule-satisfying synthetic episodes by trajectory optimisation",
    "train": "train a diffusion / flow / one-step flow policy on an EpisodeStore",
    "eval": "closed-loop evaluation of a checkpoint (success, STL satisfaction, latency)",
    "control": "run a policy in the fixed-rate robot control loop",
    "serve-sim": "serve a MuJoCo task as a sim twin over a network transport",
    "data": "inspect, import and export datasets: `data info PATH`, `data import {d4rl,minari,dp,rosbag} SRC OUT`, "
            "`data export rosbag STORE OUT`",
    "stl": "STL tools: `stl check FORMULA --signals FILE --dt DT [--param k=v]`",
    "d4rl": "offline RL on D4RL / Minari data with normalised scores",
    "demo": "the whole pipeline on the default task in minutes on a CPU (table, plots, video)",
    "bench": "run the benchmark scripts and print their figures",
}

USAGE = """usage: stlflow <verb> [args or hydra overrides]

Diffusion and flow policies for robots, shaped by Signal Temporal Logic rules.

verbs:
{verbs}

Job verbs take Hydra overrides, e.g.
  stlflow collect env=crossing episodes=200 out=demos.zarr
  stlflow train env=crossing policy=flow data=demos.zarr out=ckpt train.steps=2000
`stlflow <verb> --help` explains one verb and prints its configuration.
Bad input gives one message on stderr and exit status 2; `stlflow --debug <verb> ...` (or STLFLOW_DEBUG=1) shows
the traceback too.
"""


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = "\n".join(f"  {v.ljust(width)}  {d}" for v, d in VERBS.items())
    return USAGE.format(verbs=lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # tracebacks for bad input too (every verb reads STLFLOW_DEBUG)
        import os

        argv.remove("--debug")
        os.environ["STLFLOW_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from stlflow import __version__

        print(f"stlflow {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"stlflow: unknown verb {verb!r}; known verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module_name = "stlflow.verbs." + verb.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"stlflow {verb}: not implemented yet ({VERBS[verb]}).", file=sys.stderr)
        return 3
    try:
        return int(module.main(rest) or 0)
    except BrokenPipeError:  # `stlflow ... | head`: the reader went away; exit quietly like other CLI tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
