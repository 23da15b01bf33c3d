"""MuJoCo task environments with STL rules (``stlflow.envs``).

Importing this package registers the gymnasium ids:

- ``stlflow/Crossing-v0``  -- planar robot in a corridor, pedestrians crossing (:mod:`stlflow.envs.crossing`)
- ``stlflow/PickPlace-v0`` -- Cartesian end-effector, binary gripper, two target zones (:mod:`stlflow.envs.pickplace`)

Every task env (``env.unwrapped``) exposes:

- ``dt`` (seconds per control step), ``rules`` (parametric STL text), ``rule_defaults`` (dict),
- ``signals(obs) -> dict[str, ndarray]``: the STL signals from observations shaped (T, Do) or (B, T, Do);
  each step's ``info["signals"]`` holds the same values for the observation that step returned,
- ``discrete_action_mask``: bool array (Da,), True where the action channel is discrete (values {-1, +1}),
- ``make_expert(seed) -> Expert``: the task's scripted expert (see :class:`stlflow.envs.base.Expert`).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from stlflow.envs.base import Expert, make_env, make_expert

__all__ = ["Expert", "make_env", "make_expert"]

_ENTRY_POINTS = {
    "stlflow/Crossing-v0": "stlflow.envs.crossing:CrossingEnv",
    "stlflow/PickPlace-v0": "stlflow.envs.pickplace:PickPlaceEnv",
}

for _id, _entry in _ENTRY_POINTS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry)
