"""Make diverse, rule-satisfying synthetic episodes from demonstrations by trajectory optimisation.

    stlflow augment data=demos.zarr out=augmented.zarr per_demo=8 [env=crossing] [workers=2] [seed=0]

For each demonstration, from its start state (the env reset with the episode's seed): sample STL parameters θ
for every behaviour mode of the task (its STL settings, conf/stl/<env>.yaml: the rules plus per-mode
formulas, e.g. pass in front, pass behind, yield, swerve left or right), including modes and values the
demonstration did not show; optimise
``n_theta x n_init`` random control sequences per mode at once with Adam through the task's differentiable
dynamics model (hinge on smooth robustness at a small positive margin, plus a control-bound penalty); pick
``per_demo`` of the candidates that satisfy their θ by group-balanced farthest-point selection; replay each in
the real MuJoCo env and keep it only if it satisfies its θ there (exact robustness >= 0) without collision.

Demonstrations are processed in batches of ``opt.batch_demos`` (default 8): the candidates of a whole batch are
optimised in one tensor program (Crossing: a batched drive model) and replayed together (Crossing and PickPlace:
MuJoCo's multi-threaded ``mujoco.rollout`` with ``opt.replay_threads`` threads; every Crossing rollout is verified
against the env's own step, else replayed through the env); ``opt.batch_demos=1`` augments one demonstration at a
time. The stored episodes do not depend on the batching beyond float round-off.

The demonstrations need ``stl_params`` (run ``stlflow calibrate`` first; without it the task defaults are used).
Output: an EpisodeStore with the demo store's keys (obs, action, signal_*) and per-episode attributes
``source=augmented``, ``mode``, ``stl_params``, ``seed``, ``parent_episode``. Deterministic for a seed, for any
number of workers. Prints the acceptance rate, diversity before/after selection and throughput.

Tasks: Crossing is optimised with gradients through ``env.dynamics_model()``; PickPlace has no differentiable
model, so it uses the cross-entropy method over MuJoCo rollouts from the demo's start state (perturbing the
demo's end-effector targets; its gripper timing is kept), selected by ``stl.opt`` in conf/stl/pickplace.yaml.
Its two modes are the target zones: the demo's own zone starts from the demo's actions, the other zone from the
demo retargeted there (``retarget_pick_place``), so every demo yields placements in both zones.
"""

from __future__ import annotations

from stlflow.config import plain, run_job, verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("augment", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.control.jobs import AugmentJob
    from stlflow.control.stl_data import augment, format_augment_report

    def run() -> int:
        job = AugmentJob(cfg.data, cfg.out, task=str(cfg.env.name), per_demo=int(cfg.per_demo),
                         episodes=None if cfg.get("episodes") is None else int(cfg.episodes),
                         modes=list(cfg.modes) if cfg.get("modes") else None, workers=int(cfg.workers),
                         seed=int(cfg.seed), overwrite=bool(cfg.overwrite), progress=bool(cfg.get("progress", True)),
                         opt=plain(cfg.opt), stl=plain(cfg.stl))
        report = augment(job)
        print(f"wrote {report.n_accepted} augmented episodes to {cfg.out}")
        print(format_augment_report(report))
        return 0

    return run_job("augment", run)
