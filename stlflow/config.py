"""Hydra composition for the job verbs.

Every job verb has a primary config ``conf/<verb>.yaml`` that pulls in the config groups
(``env/``, ``policy/``, ``train/``, ``control/``, ``stl/``, ``experiment/``). Overrides are
the usual Hydra strings: ``env=pickplace``, ``train.steps=2000``, ``+extra=1``.
We use the compose API rather than ``@hydra.main`` so that one console script can host many
verbs and so that nothing changes the working directory behind the user's back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``stlflow.conf/<config_name>.yaml`` with Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module="stlflow.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def verb_config(verb: str, argv: list[str], doc: str) -> DictConfig | None:
    """Parse a job verb's argv. Prints help (doc + the composed config) and returns None on --help."""
    if any(a in ("-h", "--help") for a in argv):
        overrides = [a for a in argv if a not in ("-h", "--help")]
        print(f"usage: stlflow {verb} [hydra overrides]\n\n{doc.strip()}\n\nconfiguration (override key=value):")
        print(OmegaConf.to_yaml(compose(verb, overrides)))
        return None
    try:
        return compose(verb, argv)
    except Exception as err:  # hydra's own messages name the bad override; keep them, drop the traceback
        print(f"stlflow {verb}: bad configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def plain(node: Any) -> Any:
    """A composed config node as plain Python (dicts, lists, scalars), interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def run_job(verb: str, fn: Callable[[], int | None]) -> int:
    """Run a verb's work: input errors (a bad job, a missing or existing file, a wrong value) become one line on
    stderr naming the verb, and exit status 2; anything else keeps its traceback."""
    from stlflow.control.jobs import JobError
    from stlflow.control.workers import WorkerError

    try:
        return int(fn() or 0)
    except (JobError, FileNotFoundError, FileExistsError, KeyError, ValueError, NotImplementedError) as err:
        print(f"stlflow {verb}: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        if isinstance(err.__cause__, (JobError, ValueError, KeyError, FileNotFoundError)):
            print(f"stlflow {verb}: {err.summary}", file=sys.stderr)
            return 2
        raise
