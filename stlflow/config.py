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


def verb_config(verb: str, argv: list[str], doc: str, config_name: str | None = None) -> DictConfig | None:
    """Parse a job verb's argv against ``conf/<config_name or verb>.yaml``. Prints help (doc + the composed config)
    and returns None on --help; a bad override is one line on stderr and exit status 2."""
    config_name = config_name or verb
    if any(a in ("-h", "--help") for a in argv):
        overrides = [a for a in argv if a not in ("-h", "--help")]
        print(f"usage: stlflow {verb} [hydra overrides]\n\n{doc.strip()}\n\nconfiguration (override key=value):")
        print(OmegaConf.to_yaml(compose(config_name, overrides)))
        return None
    try:
        return compose(config_name, argv)
    except Exception as err:  # hydra's own messages name the bad override; keep them, drop the traceback
        print(f"stlflow {verb}: bad configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def plain(node: Any) -> Any:
    """A composed config node as plain Python (dicts, lists, scalars), interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def debugging() -> bool:
    """True when tracebacks are wanted for bad input too (``stlflow --debug ...`` or ``STLFLOW_DEBUG=1``)."""
    import os

    return os.environ.get("STLFLOW_DEBUG", "") not in ("", "0")


# Errors that mean "the input is wrong" (every error class of the package is a ValueError subclass; a missing or
# existing file is an OSError): one paragraph on stderr, exit status 2. Anything else is a bug: traceback, exit 1.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError, NotImplementedError)


def run_job(verb: str, fn: Callable[[], int | None]) -> int:
    """Run a verb's work, turning bad input (:data:`INPUT_ERRORS`, also when raised inside a worker process) into
    one paragraph on stderr naming the verb, and exit status 2; with :func:`debugging` the traceback is shown."""
    from stlflow.control.workers import WorkerError

    try:
        return int(fn() or 0)
    except INPUT_ERRORS as err:
        if debugging():
            raise
        print(f"stlflow {verb}: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        names = {cls.__name__ for cls in INPUT_ERRORS}
        if debugging() or err.summary.split(":", 1)[0].rsplit(".", 1)[-1] not in names:
            raise
        print(f"stlflow {verb}: {err.summary.split(':', 1)[-1].strip()} (in worker, job {err.index})", file=sys.stderr)
        return 2


def controller_options(cfg: DictConfig, expert_note: str = "") -> dict[str, Any]:
    """The controller block of a verb's config (``controller=NAME`` / ``control.*``) with the ``k=`` shortcut
    applied (a fixed k solver steps a plan: it turns RTI's per-tick budget ``nfe_per_tick`` off); refuses ``k`` for
    a controller without it and a missing ``ckpt`` for a policy controller."""
    from stlflow.control.controllers import EXPERT
    from stlflow.control.jobs import JobError

    control = plain(cfg.control)
    if cfg.k is not None:
        if "k" not in control:
            raise JobError(f"controller {control['name']!r} takes no k")
        control["k"] = int(cfg.k)
        control.pop("nfe_per_tick", None)
    if control["name"] != EXPERT and cfg.ckpt is None:
        raise JobError(f"ckpt=DIR is required (or controller=expert{expert_note})")
    return control
