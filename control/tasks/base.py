"""What a task is to the rest of the package: one typed :class:`Task` per task, in one registry.

A task joins what the lower layers know separately: the MuJoCo env (``stlflow.envs``: dynamics, rules, expert),
its STL settings (``conf/stl/<name>.yaml``: calibration, augmentation modes), the differentiable robot model that
STL guidance plans through, the augmentation problem built from a demonstration, and the readers the metrics need
(behaviour mode, path, speed). Verbs, the pipeline and the benchmarks ask the registry
(:func:`stlflow.control.tasks.get_task`) and never name an env id themselves.

θ (``stl_params``) is one concept with one resolver: :meth:`Task.resolve_theta` = the rules' defaults overridden
by the requested values, each requested name checked against the task's θ names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EnvInfo:
    """What the env of a task declares (read once from an instance): ``dt`` (s per control step), ``rules``
    (parametric STL text), ``rule_list`` (name -> STL text of each conjunct), ``rule_defaults`` (θ name -> value),
    ``discrete_action_mask`` (Da,) bool, ``max_steps``, ``obs_dim``, ``action_dim``."""

    dt: float
    rules: str
    rule_list: dict[str, str]
    rule_defaults: dict[str, float]
    discrete_action_mask: tuple[bool, ...]
    max_steps: int
    obs_dim: int
    action_dim: int


class Task:
    """One task: subclass it in ``control/tasks/<name>.py`` and add one line to the registry.

    Class attributes a task sets:
        name: short name (the Hydra ``env=`` choice, e.g. ``crossing``).
        env_id: the gymnasium id (registered by :mod:`stlflow.envs` or by the task's own module).
        path: slice of the observation whose closed-loop paths the diversity measures compare (e.g. robot xy).
        speed_signal / speed_rule: the STL signal whose maximum the controllability sweep measures, and the rule
            that bounds it by ``v_max`` (None: the task has no speed limit to sweep).
        sweep: default requested ``v_max`` values of the STL benchmark.
        cell: grid cell (m) of the valid-area measure.
        guided_rules: the rules STL guidance can decide through :meth:`dynamics` (empty: no guidance).
        guidance_options: the task's own defaults of :class:`stlflow.policy.guidance.STLGuidance` options.
    """

    name: str = ""
    env_id: str = ""
    path: slice = slice(0, 2)
    speed_signal: str | None = None
    speed_rule: str | None = None
    sweep: tuple[float, ...] = ()
    cell: float = 0.1
    guided_rules: tuple[str, ...] = ()
    guidance_options: Mapping[str, Any] = {}

    # ------------------------------------------------------------------------------------------ the env
    def make_env(self, env_kwargs: Mapping[str, Any] | None = None, render_mode: str | None = None) -> Any:
        """A fresh gymnasium env of this task."""
        from stlflow.envs import make_env

        return make_env(self.env_id, env_kwargs, render_mode=render_mode)

    @cached_property
    def info(self) -> EnvInfo:
        """:class:`EnvInfo` read from one instance with the default settings (cached)."""
        env = self.make_env()
        try:
            u = env.unwrapped
            return EnvInfo(
                dt=float(u.dt),
                rules=str(u.rules),
                rule_list={str(k): str(v)
                           for k, v in dict(getattr(u, "rule_list", None) or {"rules": u.rules}).items()},
                rule_defaults={str(k): float(v) for k, v in dict(u.rule_defaults).items()},
                discrete_action_mask=tuple(bool(b) for b in np.asarray(u.discrete_action_mask).reshape(-1)),
                max_steps=int(getattr(u, "max_steps", 0) or 0),
                obs_dim=int(np.prod(env.observation_space.shape)),
                action_dim=int(np.prod(env.action_space.shape)),
            )
        finally:
            env.close()

    def metadata(self, env_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Store-level attributes of a recording of this task (JSON-able)."""
        i = self.info
        return {"env_id": self.env_id, "task": self.name, "env_kwargs": dict(env_kwargs or {}), "dt": i.dt,
                "rules": i.rules, "rule_defaults": dict(i.rule_defaults), "rule_list": dict(i.rule_list),
                "discrete_action_mask": list(i.discrete_action_mask), "max_steps": i.max_steps}

    # ------------------------------------------------------------------------------------------ θ
    @property
    def theta_names(self) -> tuple[str, ...]:
        """The names of θ: every free parameter of the task's rules, in the rules' default order."""
        return tuple(self.info.rule_defaults)

    def resolve_theta(self, requested: Mapping[str, Any] | None = None) -> dict[str, float]:
        """θ for an episode: the rules' defaults overridden by ``requested``; an unknown name is refused."""
        return resolve_theta(self.info.rule_defaults, requested, owner=f"task {self.name!r}")

    # ------------------------------------------------------------------------------------------ STL settings
    def stl_config(self) -> dict[str, Any]:
        """The task's STL settings (``stlflow.conf/stl/<name>.yaml``: calibration, augmentation modes); {} if none."""
        import yaml

        path = resources.files("stlflow.conf").joinpath("stl", f"{self.name}.yaml")
        if not path.is_file():
            return {}
        return dict(yaml.safe_load(path.read_text()) or {})

    # ------------------------------------------------------------------------------------------ metrics readers
    def mode(self, obs: np.ndarray) -> str:
        """Behaviour mode of a closed-loop trajectory ``obs`` (T, Do); ``"none"`` where the task has no modes."""
        return "none"

    def path_of(self, obs: np.ndarray) -> np.ndarray:
        """The path the diversity measures compare: ``obs[:, path]`` as float64 (T, D)."""
        return np.asarray(obs)[:, self.path].astype(np.float64)

    # ------------------------------------------------------------------------------------------ guidance
    def dynamics(self) -> Any:
        """The differentiable robot model guidance plans through (needed when ``guided_rules`` is not empty)."""
        raise NotImplementedError(f"task {self.name!r} has no differentiable robot model")

    def model_inputs(self, obs_history: np.ndarray, horizon: int) -> tuple[Any, Any]:
        """(start state (1, S), context) of :meth:`dynamics` for ``horizon`` steps from the newest observation."""
        raise NotImplementedError(f"task {self.name!r} has no differentiable robot model")

    def guidance(self, stl_params: Mapping[str, Any] | None = None, rules: Sequence[str] | None = None,
                 **options: Any) -> Any:
        """:class:`stlflow.policy.guidance.STLGuidance` on the conjunction of ``rules`` (default: every guided
        rule) at θ = :meth:`resolve_theta` (``stl_params``); ``options`` override :attr:`guidance_options`
        (``scale``, ``max_step``, ``margin``, ``smooth``, ``iters``, ``t_max``, ``particles``)."""
        from stlflow.policy.guidance import STLGuidance

        if not self.guided_rules:
            raise ValueError(f"task {self.name!r} has no STL guidance model; tasks with one: "
                             f"{guided_task_names()}")
        rules = tuple(self.guided_rules if rules is None else rules)
        unknown = [r for r in rules if r not in self.guided_rules]
        if unknown:
            raise ValueError(f"{self.name} guidance models only the rules {list(self.guided_rules)}; got {unknown}")
        text = " & ".join(self.info.rule_list[r] for r in rules)
        return STLGuidance(text, self.dynamics(), self.model_inputs, self.info.dt,
                           params=self.resolve_theta(stl_params), **{**dict(self.guidance_options), **options})

    # ------------------------------------------------------------------------------------------ augmentation
    def augmentation(self, env_kwargs: Mapping[str, Any], stl_cfg: Mapping[str, Any],
                     modes: Sequence[str] | None = None, dtype: str = "float32") -> Any:
        """The :class:`stlflow.datasets.augment.AugmentTask` of this task (built in each augmentation worker)."""
        raise NotImplementedError(f"task {self.name!r} has no STL augmentation")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, env_id={self.env_id!r})"


def resolve_theta(defaults: Mapping[str, float], requested: Mapping[str, Any] | None, owner: str = "the rules"
                  ) -> dict[str, float]:
    """``defaults`` overridden by ``requested`` (values as floats); a name not in ``defaults`` raises ValueError
    naming the known ones."""
    requested = dict(requested or {})
    unknown = sorted(set(requested) - set(defaults))
    if unknown:
        raise ValueError(f"unknown θ name(s) {unknown} for {owner}; known: {sorted(defaults)}")
    out = {str(k): float(v) for k, v in defaults.items()}
    for k, v in requested.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"θ {k}={v!r} for {owner} is not a number") from err
    return out


def guided_task_names() -> list[str]:
    from stlflow.control.tasks import TASKS

    return sorted(name for name, t in TASKS.items() if t.guided_rules)
