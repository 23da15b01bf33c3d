"""Run a task's scripted expert in the control loop and record demonstrations into an EpisodeStore.

    stlflow collect env=crossing episodes=200 out=demos.zarr [workers=2] [seed=0] [overwrite=true]

Episode i uses seed `seed+i` (env reset and expert). Stored per episode: `obs` (T, Do), the observation each
action was chosen from; `action` (T, Da); `signal_<name>` (T,), each STL signal of the state reached after
action[t]; attributes seed, mode, style, success, collision, source, env_id, length. The store's attributes hold
the env id, dt, the rules and their default parameters. The output is identical for any number of workers.
"""

from __future__ import annotations

from stlflow.config import plain, run_job, verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("collect", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob

    def run() -> int:
        job = CollectJob(str(cfg.env.name), int(cfg.episodes), cfg.out, seed=int(cfg.seed), workers=int(cfg.workers),
                         overwrite=bool(cfg.overwrite), env_kwargs=plain(cfg.env.get("kwargs") or {}),
                         progress=bool(cfg.get("progress", True)))
        store = collect(job)
        ok = sum(bool(store.episode_attrs(i).get("success")) for i in range(store.n_episodes))
        print(f"wrote {store.n_episodes} episodes of {store.attrs['env_id']} to {cfg.out} "
              f"(expert success {ok}/{store.n_episodes})")
        return 0

    return run_job("collect", run)
