"""Run a task's scripted expert in the control loop and record demonstrations into an EpisodeStore.

    stlflow collect env=crossing episodes=200 out=demos.zarr [workers=2] [seed=0] [overwrite=true]

Episode i uses seed `seed+i` (env reset and expert). Stored per episode: `obs` (T, Do), the observation each
action was chosen from; `action` (T, Da); `signal_<name>` (T,), each STL signal of the state reached after
action[t]; attributes seed, mode, style, success, collision, source, env_id, length. The store's attributes hold
the env id, dt, the rules and their default parameters. The output is identical for any number of workers.
"""

from __future__ import annotations

import sys

from stlflow.config import verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("collect", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.control.collect import collect

    try:
        store = collect(cfg.env.id, int(cfg.episodes), cfg.out, seed=int(cfg.seed), workers=int(cfg.workers),
                        overwrite=bool(cfg.overwrite), env_kwargs=dict(cfg.env.get("kwargs") or {}),
                        progress=bool(cfg.get("progress", True)))
    except (FileExistsError, ValueError) as err:
        print(f"stlflow collect: {err}", file=sys.stderr)
        return 2
    ok = sum(bool(store.episode_attrs(i).get("success")) for i in range(store.n_episodes))
    print(f"wrote {store.n_episodes} episodes of {cfg.env.id} to {cfg.out} (expert success {ok}/{store.n_episodes})")
    return 0
