"""Run a policy in the fixed-rate robot control loop, on the in-process simulator or a sim twin over ZeroMQ.

    stlflow control ckpt=DIR env=crossing controller=rti k=2 episodes=5 robot=sim mode=lockstep out=DIR
    stlflow control ckpt=DIR robot=sim mode=realtime speed=10 rate_hz=100 rt_priority=1
    stlflow control ckpt=DIR robot=zmq addr=ipc:///tmp/stlflow-twin speed=5 rate_hz=50 mode=realtime
    stlflow control controller=expert robot=sim env.kwargs.max_steps=50

Every episode runs through stlflow.control.realtime.RealtimeLoop: the controller on its inference worker, actions
through the safety layer (NaN hold, clamp, rate limit, stale-observation watchdog, e-stop latch). `robot=sim` is the
MuJoCo task in this process (`mode=lockstep`: a virtual clock, reproducible; `mode=realtime`: the wall clock at
dt/speed seconds per tick); `robot=zmq` drives a running `stlflow serve-sim` at `addr`. `rate_hz` must equal
speed/dt. `inference=auto|process|thread` (default auto: in mode=realtime the controller runs in a worker process
of its own, pinned to another core than the loop, so it never holds the loop thread's GIL; in lock-step, and for
the expert, on a thread). In realtime mode an RTI controller plans on the lock-step schedule of `stlflow eval
delay=1` (a plan every `interval` ticks, at least 2; the action that runs while a plan is made kept fixed), and
each tick reads the newest plan at the ticks elapsed since its observation. Writes OUT/report.json (per episode:
success, e-stop and reason, lateness, overruns, observation age, command age (ticks from the tick of the observation
a command was planned from to the tick it is applied: 1 when it lands on the step after its observation, as in
`stlflow eval delay=1`), action sources, safety counters; and the aggregate), OUT/report.md,
OUT/lateness_hist.png and, with record=true, OUT/episodes.zarr (obs, action, per-tick timing keys, written off the
loop's thread).
Exit status: 0; 2 for a refusal before connecting (dimensions, rate, robot kind, a twin that does not answer);
130 after SIGINT / SIGTERM (the robot held, the partial episode saved with complete=false); 1 after an e-stop.
"""

from __future__ import annotations

import sys

from stlflow.config import controller_options, plain, run_job, verb_config

VERB = "control"


def _config(argv: list[str]):
    """The composed ``run`` config (``controller=NAME`` is the alias of ``control=NAME``), or None after --help."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("controller=")]
    return verb_config(VERB, [*argv, *(f"control={c}" for c in chosen[-1:])], __doc__, config_name="run")


def _inference(argv: list[str]) -> tuple[list[str], str]:
    """``inference=...`` (a verb option beside the composed config) taken out of ``argv``: (the rest, its value)."""
    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("inference=")]
    return [a for a in argv if not a.lstrip("+").startswith("inference=")], (chosen[-1] if chosen else "auto")


def main(argv: list[str]) -> int:
    argv, inference = _inference(argv)
    cfg = _config(argv)
    if cfg is None:
        return 0
    return run_job(VERB, lambda: control_from_config(cfg, inference))


def job_from_config(cfg, inference: str = "auto"):
    from stlflow.control.controllers import EXPERT, ControllerSpec
    from stlflow.control.robot_run import RobotJob
    from stlflow.control.safety import SafetyConfig

    control = controller_options(cfg, " on robot=sim")
    safety = plain(cfg.safety) or {}
    return RobotJob(
        task=str(cfg.env.name), robot=str(cfg.robot), policy=None if control["name"] == EXPERT else str(cfg.ckpt),
        controller=ControllerSpec.from_dict(control), episodes=int(cfg.episodes), seed=int(cfg.seed), out=str(cfg.out),
        rate_hz=opt(cfg.rate_hz, float), speed=float(cfg.speed), mode=str(cfg.mode), addr=opt(cfg.addr, str),
        record=bool(cfg.record), rt_priority=opt(cfg.rt_priority, int), stl_params=plain(cfg.stl_params) or {},
        env_kwargs=plain(cfg.env.get("kwargs") or {}), safety=SafetyConfig(**safety), delay=int(cfg.delay),
        max_ticks=opt(cfg.max_ticks, int), obs_wait=opt(cfg.obs_wait, float),
        stale_timeout=float(cfg.stale_timeout), connect_timeout=float(cfg.connect_timeout), inference=inference)


def opt(value, kind):
    """``kind(value)``, or None for None."""
    return None if value is None else kind(value)


def control_from_config(cfg, inference: str = "auto") -> int:
    from stlflow.control.robot_run import run

    job = job_from_config(cfg, inference)

    def progress(rec) -> None:
        print(f"episode seed {rec['seed']}: {rec['end_reason']}, {rec['ticks']} ticks, lateness p99 "
              f"{rec['lateness_ms']['p99']:.3f} ms, overruns {rec['overruns']}", flush=True)

    def start(seed) -> None:
        print(f"episode seed {seed}: running on robot={job.robot} ({job.mode})", flush=True)

    result = run(job, on_episode=progress, on_start=start)
    print(result.paths["markdown"].read_text())
    print(f"report: {result.paths['json']}  plot: {result.paths['lateness_hist']}"
          + (f"  episodes: {result.report['recorded']}" if job.record else ""), flush=True)
    if result.interrupted:
        print(f"stlflow {VERB}: interrupted ({result.estop or 'signal'}); the robot holds, the partial episode is "
              f"saved", file=sys.stderr)
        return 130
    if result.estop is not None:
        print(f"stlflow {VERB}: e-stop: {result.estop}", file=sys.stderr)
        return 1
    return 0
