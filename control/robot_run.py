"""Running a policy on a robot: the work of ``stlflow control`` (robot construction, episodes, recording, report).

::

    job = RobotJob(task="crossing", robot="sim", policy="ckpt/", controller=ControllerSpec.create("rti", k=2),
                   episodes=5, seed=0, out="control_out", rate_hz=10.0, mode="lockstep", record=True)
    check(job)          # refusals (JobError) before anything connects: robot kind, dimensions, rate
    result = run(job)   # episodes through RealtimeLoop; report.json / report.md / lateness_hist.png; episodes.zarr

Robots: ``sim`` is :class:`~stlflow.control.sim_robot.SimRobot` in this process (``mode=lockstep`` on a virtual
clock, ``mode=realtime`` on its own thread at ``dt / speed`` wall seconds per step); ``zmq`` is
:class:`~stlflow.control.zmq_robot.ZmqRobot`, a client of a running ``stlflow serve-sim`` at ``addr``.

The rate: the loop ticks every ``dt / speed`` seconds of its clock, so ``rate_hz`` must equal ``speed / dt`` (for
Crossing, dt = 0.1 s: 10 Hz at speed 1, 50 Hz at speed 5); a mismatch is refused.

Each episode is one :meth:`RealtimeLoop.run`; SIGINT / SIGTERM latch the loop's e-stop (the robot holds) and end
the episode, which is still reported and recorded, with ``complete=false`` and its end reason. Any e-stop ends the
run (no further episode starts). Recording happens on :class:`~stlflow.control.record_writer.RecordWriter`'s
thread after each episode, never on the loop's thread during a tick. The report and the stored arrays are made by
:mod:`stlflow.control.run_report` (``markdown`` and ``write_outputs`` are importable from here too).

Stored keys of one recorded episode (T ticks): ``obs`` (T, Do) the observation each tick used, ``action`` (T, Da)
the action commanded (the task's hold action on held ticks), ``tick_index`` / ``tick_lateness_s`` /
``tick_missed`` / ``tick_late`` / ``obs_age_s`` / ``obs_seq`` / ``plan_seq`` / ``elapsed`` (ticks since the plan's
observation: the command's age) / ``infer_s`` / ``nfe`` / ``busy_s`` / ``source`` (index into
:data:`stlflow.control.realtime.SOURCES`: 0 fresh, 1 chunk, 2 hold, 3 estop) / ``clamped`` / ``rate_limited`` /
``nonfinite`` / ``stale``; attributes ``seed``, ``success``, ``complete``, ``end_reason``, ``estop``, ``robot``,
``controller``.

Command age, one convention for the loop and the twin: the ticks from the tick of the observation a command was
planned from to the tick it is applied (the robot's step that acts on the state observed at that tick). The loop's
deadlines lie on the robot's observation grid and a command goes out right after the tick's observation arrives,
so a command sent at tick k is applied at tick k: the loop's ``elapsed`` is the age, and the twin's ``command_age``
(counted where the command lands) agrees. A plan's first command is 1 tick old when the plan was ready within the
tick (``plan_delay_ticks``), as in ``stlflow eval delay=1``; with RTI's ``interval`` a plan then serves ``interval``
ticks, so the ages run 1 .. interval (median (interval + 1) / 2), in lock-step evaluation as here.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.controllers import EXPERT, LOCKSTEP_ONLY, ControllerSpec
from stlflow.control.jobs import JobError
from stlflow.control.robot import RobotError
from stlflow.control.run_report import aggregate, episode_arrays, episode_record, markdown, write_outputs
from stlflow.control.safety import SafetyConfig

__all__ = ["INFERENCE", "MODES", "ROBOTS", "EpisodeController", "RobotJob", "RunResult", "check", "make_robot",
           "markdown", "run", "write_outputs"]

ROBOTS = ("sim", "zmq")
MODES = ("realtime", "lockstep")
INFERENCE = ("auto", "process", "thread")
RATE_TOLERANCE = 1e-3  # relative


@dataclass(frozen=True)
class RobotJob:
    """One ``stlflow control`` run.

    Args:
        task: task name (``stlflow.control.tasks`` registry).
        robot: ``sim`` or ``zmq``.
        policy: checkpoint directory or a Policy (None for ``controller=expert``).
        controller: the controller spec (``rti``, ``receding``, ..., ``expert`` on ``robot=sim`` only).
        episodes / seed: episode i runs with seed ``seed + i`` (robot reset and the controller's noise).
        out: report folder (``report.json``, ``report.md``, ``lateness_hist.png``, ``episodes.zarr``).
        rate_hz: the loop's rate (None: ``speed / dt``); refused unless ``rate_hz * dt == speed``.
        speed: robot seconds per wall second (sim: the SimRobot's; zmq: must match the twin's).
        mode: ``lockstep`` or ``realtime`` (sim: virtual clock or wall clock; zmq: wait for every plan or not).
        addr: the twin's address (zmq).
        record: write ``out/episodes.zarr``.
        rt_priority: SCHED_FIFO priority of the loop's thread, of a ``sim`` robot's stepping thread and of the
            inference process (on its own core; a thread worker stays at normal priority). None: normal.
        stl_params: θ for a conditioned policy (over the task's defaults).
        env_kwargs: the env's keyword arguments (sim).
        safety: the safety layer's settings.
        delay: injected observation-to-action delay in ticks.
        max_ticks: cap on ticks per episode (None: until the robot ends the episode).
        obs_wait: seconds each tick waits for a fresh observation (None: 0 in lock-step, else 30% of the period).
        stale_timeout: zmq: seconds of silence from the twin after which the robot counts as lost.
        connect_timeout: zmq: seconds to wait for the twin's answer.
        handle_signals: SIGINT / SIGTERM latch the e-stop during an episode (needs the main thread).
        inference: where the controller runs: ``process`` (:class:`~stlflow.control.inference.InferenceProcess`,
            one for the whole run, on its own core), ``thread`` (a thread of this process per episode), ``auto``
            (process in realtime mode, thread in lock-step, where the loop waits for every plan anyway, and for the
            scripted expert, which reads the in-process simulator).
    """

    task: str
    robot: str = "sim"
    policy: Any = None
    controller: ControllerSpec = field(default_factory=lambda: ControllerSpec.create("rti"))
    episodes: int = 1
    seed: int = 0
    out: str | Path = "control_out"
    rate_hz: float | None = None
    speed: float = 1.0
    mode: str = "lockstep"
    addr: str | None = None
    record: bool = True
    rt_priority: int | None = None
    stl_params: Mapping[str, float] = field(default_factory=dict)
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    delay: int = 0
    max_ticks: int | None = None
    obs_wait: float | None = None
    stale_timeout: float = 1.0
    connect_timeout: float = 5.0
    handle_signals: bool = True
    inference: str = "auto"


@dataclass
class RunResult:
    """What :func:`run` did: the report dict (``report.json``), the paths written, the episode indices recorded,
    and ``interrupted`` (a SIGINT / SIGTERM ended the run: the verb exits 130)."""

    report: dict[str, Any]
    paths: dict[str, Path]
    recorded: list[int]
    interrupted: bool = False

    @property
    def estop(self) -> str | None:
        return self.report["aggregate"]["estop"]


# ------------------------------------------------------------------------------------------------ set-up
def make_robot(job: RobotJob) -> Any:
    """The robot of ``job``, not yet connected (a ZmqRobot asks the twin for its spec, which needs an answer)."""
    if job.robot not in ROBOTS:
        raise JobError(f"unknown robot {job.robot!r}; choose one of {list(ROBOTS)}")
    if job.mode not in MODES:
        raise JobError(f"unknown mode {job.mode!r}; choose one of {list(MODES)}")
    if not (isinstance(job.speed, (int, float)) and math.isfinite(job.speed) and job.speed > 0):
        raise JobError(f"speed must be a number > 0 (robot seconds per wall second); got {job.speed!r}")
    if job.robot == "sim":
        from stlflow.control.sim_robot import SimRobot

        return SimRobot(job.task, env_kwargs=job.env_kwargs, realtime=job.mode == "realtime", speed=float(job.speed),
                        rt_priority=job.rt_priority)
    from stlflow.control.zmq_robot import ZmqRobot

    if not job.addr:
        raise JobError("robot=zmq needs addr= (the address given to `stlflow serve-sim`, e.g. ipc:///tmp/stlflow-twin)")
    try:
        return ZmqRobot(str(job.addr), connect_timeout=job.connect_timeout, stale_timeout=job.stale_timeout)
    except RobotError as err:
        raise JobError(f"addr={job.addr}: {err}") from err


def _policy_of(job: RobotJob) -> Any:
    if job.controller.name == EXPERT:
        return None
    if job.policy is None:
        raise JobError(f"controller {job.controller.name!r} needs ckpt=DIR (or controller=expert on robot=sim)")
    from stlflow.control.evaluate import load_policy

    return load_policy(job.policy)


def check(job: RobotJob, robot: Any = None, policy: Any = None) -> tuple[Any, Any]:
    """Every refusal before the robot connects (:class:`JobError`): robot kind and mode, a controller the robot
    cannot run, a twin that does not answer (naming its address), the policy's dimensions against the robot's, the
    rate against ``speed / dt``, θ names. Returns ``(robot, policy)`` (robot not connected)."""
    from stlflow.control.evaluate import policy_theta
    from stlflow.control.tasks import get_task

    if int(job.episodes) < 1:
        raise JobError(f"episodes must be >= 1, got {job.episodes}")
    if job.robot not in ROBOTS:
        raise JobError(f"unknown robot {job.robot!r}; choose one of {list(ROBOTS)}")
    if job.inference not in INFERENCE:
        raise JobError(f"unknown inference {job.inference!r}; choose one of {list(INFERENCE)}")
    if job.controller.name == EXPERT and job.inference == "process":
        raise JobError("controller=expert reads the in-process simulator's state: it runs with inference=thread")
    if job.controller.name == EXPERT and job.robot != "sim":
        raise JobError("controller=expert reads the simulator's state: it runs on robot=sim only")
    if job.controller.name in LOCKSTEP_ONLY:
        raise JobError(f"controller={job.controller.name} simulates an inference worker in lock-step (stlflow eval "
                       f"delay=d); the wall-clock loop has its own worker: run controller=rti or receding here")
    task = get_task(job.task)
    theta = task.resolve_theta(dict(job.stl_params or {}))
    policy = policy if policy is not None else _policy_of(job)
    robot = robot if robot is not None else make_robot(job)
    try:
        spec = robot.spec()
    except RobotError as err:
        raise JobError(str(err)) from err
    if spec.task is not None and spec.task != task.name:
        raise JobError(f"the robot runs task {spec.task!r}, not env={task.name}: give env={spec.task}")
    if policy is not None:
        if (policy.obs_dim, policy.action_dim) != (spec.obs_dim, spec.action_dim):
            raise JobError(f"the checkpoint's dimensions (obs {policy.obs_dim}, action {policy.action_dim}) differ "
                           f"from the robot's (obs {spec.obs_dim}, action {spec.action_dim}): a policy of another task")
        policy_theta(policy, theta)
    if job.robot == "zmq" and abs(spec.speed - float(job.speed)) > RATE_TOLERANCE * spec.speed:
        raise JobError(f"speed={job.speed:g} but the twin at {job.addr} runs at {spec.speed:g}x: "
                       f"give speed={spec.speed:g}")
    if job.rate_hz is not None:
        rate = float(job.rate_hz)
        if not (math.isfinite(rate) and rate > 0):
            raise JobError(f"rate_hz must be a number > 0; got {job.rate_hz!r}")
        if abs(rate * spec.dt - spec.speed) > RATE_TOLERANCE * spec.speed:
            raise JobError(f"rate_hz={rate:g} does not match the task: dt {spec.dt:g} s at speed {spec.speed:g} "
                           f"ticks at {spec.speed / spec.dt:g} Hz (rate_hz * dt must equal speed)")
    return robot, policy


# ------------------------------------------------------------------------------------------------ episodes
def run(job: RobotJob, *, controller_factory: Callable[[Any, int], Any] | None = None,
        robot: Any = None, policy: Any = None, on_episode: Callable[[dict[str, Any]], None] | None = None,
        on_start: Callable[[int], None] | None = None) -> RunResult:
    """Check ``job`` (:func:`check`), connect the robot, run the episodes, write the outputs.

    ``controller_factory(robot, seed)`` overrides the controller ``job.controller`` builds (benchmarks inject
    faults with it); ``on_start(seed)`` before and ``on_episode(record)`` after each episode (progress)."""
    import torch

    from stlflow.control.evaluate import policy_theta
    from stlflow.control.tasks import get_task

    torch.set_num_threads(1)
    robot, policy = check(job, robot, policy)
    task = get_task(job.task)
    theta = policy_theta(policy, task.resolve_theta(dict(job.stl_params or {}))) if policy is not None else None
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        robot.connect()
    except RobotError as err:
        raise JobError(str(err)) from err
    spec = robot.spec()

    # the worker plans on the lock-step executor's schedule for the delay its plans act at (a wall-clock plan acts
    # from the tick after its observation on)
    delay = int(job.delay) if job.mode == "lockstep" else max(int(job.delay), 1)
    controller = job.controller.for_policy(policy)  # a one-step head's cold schedule (ControllerSpec.for_policy)
    interval, frozen = controller.worker_schedule(delay) if controller_factory is None else (1, 0)
    recipe = EpisodeController(controller.per_tick(delay), job.policy if isinstance(job.policy, (str, Path))
                               else policy, theta, frozen)

    def make_controller(seed: int) -> Any:
        if controller_factory is not None:
            return controller_factory(robot, seed)
        if job.controller.name == EXPERT:
            return job.controller.build(None, expert=robot.env.unwrapped.make_expert(seed))
        return recipe(seed)

    process = None
    if job.inference == "process" or (job.inference == "auto" and job.mode == "realtime" and
                                      controller_factory is None and job.controller.name != EXPERT):
        from stlflow.control.inference import InferenceProcess

        if controller_factory is not None:
            raise JobError("inference=process builds the controller from the job in the worker process; a "
                           "controller_factory runs on a thread (inference=thread)")
        process = InferenceProcess(recipe, spec.period, interval=interval, priority=job.rt_priority)
    elif controller_factory is None and job.controller.name != EXPERT and job.mode == "realtime":
        recipe.warmup()  # the thread worker's first plans would otherwise pay for the process's first network calls
    tally = _Tally()
    try:
        if process is not None:
            process.start()
        interrupted = _run_episodes(job, robot, spec, task, out, make_controller, tally, on_episode, on_start,
                                    interval, process)
    finally:
        if process is not None:
            process.stop()
    report = _report(job, task, spec, out, tally, interrupted)
    paths = write_outputs(report, out, tally.lateness)
    return RunResult(report, paths, tally.recorded, interrupted)


class EpisodeController:
    """Each episode's controller from a spec, picklable (it may be built in the inference process): ``recipe(seed)``
    builds ``spec`` on ``policy`` (a Policy, or a checkpoint folder loaded on first use) for θ ``theta``, with
    ``frozen`` actions of each RTI warm start pinned (:meth:`ControllerSpec.worker_schedule`)."""

    def __init__(self, spec: ControllerSpec, policy: Any, theta: Mapping[str, float] | None = None,
                 frozen: int = 0) -> None:
        self.spec, self.policy, self.theta, self.frozen = spec, policy, theta, int(frozen)

    def __call__(self, seed: int | None) -> Any:
        if isinstance(self.policy, (str, Path)):
            from stlflow.control.evaluate import load_policy

            self.policy = load_policy(self.policy)
        ctrl = self.spec.build(self.policy, seed=int(seed or 0), stl_params=self.theta)
        if self.frozen:  # RTIController's warm start keeps this many actions (the ones running while it plans)
            ctrl.frozen = self.frozen
        return ctrl

    def warmup(self, ticks: int = 3) -> None:
        """A few plans on a zero observation, so that the first plan of an episode does not pay for the first
        network calls of the process (allocations, lazy initialisation: tens to hundreds of ms)."""
        ctrl = self(0)
        obs = np.zeros(self.policy.obs_dim, np.float32)
        ctrl.reset(seed=0, obs=obs)
        for _ in range(ticks):
            ctrl.act(obs)


@dataclass
class _Tally:
    """What the episodes of one :func:`run` left for its report: the episode records, the per-episode lateness,
    command age (ticks, of the ticks that used a plan) and observation age, and the episodes recorded."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lateness: list[np.ndarray] = field(default_factory=list)
    elapsed: list[np.ndarray] = field(default_factory=list)
    ages: list[np.ndarray] = field(default_factory=list)
    recorded: list[int] = field(default_factory=list)


def _run_episodes(job: RobotJob, robot: Any, spec: Any, task: Any, out: Path, make_controller: Callable[[int], Any],
                  tally: _Tally, on_episode: Callable[[dict[str, Any]], None] | None,
                  on_start: Callable[[int], None] | None, interval: int = 1, process: Any = None) -> bool:
    """The episodes of ``job`` on the connected ``robot``, each through :func:`_episode` and :func:`_record`, with
    SIGINT / SIGTERM handled between them; closes the recording and the robot. Returns ``interrupted``."""
    from stlflow.control.realtime import RealtimeLoop
    from stlflow.control.record_writer import RecordWriter

    lockstep = job.mode == "lockstep"
    obs_wait = job.obs_wait if job.obs_wait is not None else (0.0 if lockstep and job.robot == "sim"
                                                              else 0.3 * spec.period)
    writer = None
    interrupted = False
    pending_signal: list[int] = []
    previous: dict[int, Any] = {}
    main_thread = threading.current_thread() is threading.main_thread()

    current: list[Any] = []

    def on_signal(signum: int, frame: Any) -> None:  # outside a loop's run: end the run, stop a loop about to run
        pending_signal.append(signum)
        if current:
            current[0].safety.latch(signal.Signals(signum).name)

    try:
        if job.handle_signals and main_thread:
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if job.record:
            writer = RecordWriter(out / "episodes.zarr", spec.dt,
                                  {"task": task.name, "source": "stlflow control", "robot": job.robot})
        for i in range(int(job.episodes)):
            if pending_signal:
                interrupted = True
                break
            seed = int(job.seed) + i
            loop = RealtimeLoop(robot, None if process is not None else make_controller(seed), safety=job.safety,
                                delay=int(job.delay), lockstep=lockstep if job.robot == "zmq" else None,
                                obs_wait=obs_wait, rt_priority=job.rt_priority, interval=interval, worker=process,
                                handle_signals=job.handle_signals and main_thread)
            current[:] = [loop]
            episode = _episode(job, robot, loop, seed, on_start)
            if episode is None:  # a signal came between the episodes
                interrupted = True
                break
            res, rec = episode
            _record(res, rec, job, task, seed, tally, writer)
            if on_episode is not None:
                on_episode(rec)
            if res.estop is not None:
                interrupted = res.estop in ("SIGINT", "SIGTERM")
                break
        if pending_signal:
            interrupted = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        tally.recorded = writer.close() if writer is not None else []
        try:
            robot.close()
        except Exception:  # noqa: BLE001 -- a lost robot: the report says so
            pass
    return interrupted


def _episode(job: RobotJob, robot: Any, loop: Any, seed: int,
             on_start: Callable[[int], None] | None) -> tuple[Any, dict[str, Any]] | None:
    """One episode on ``loop``: ``(LoopResult, its report entry)``, or None when the e-stop was latched before it
    started (a signal between the episodes)."""
    from stlflow.control.realtime import EStopLatched

    if job.robot == "zmq":
        _twin_stats(robot, clear=True)
    if on_start is not None:
        on_start(seed)
    try:
        res = loop.run(seed, max_ticks=job.max_ticks)
    except EStopLatched:
        return None
    lost = res.estop is not None and res.estop.startswith("robot lost")
    stats = _twin_stats(robot) if job.robot == "zmq" and not lost else None
    rec = episode_record(res, job, seed, stats)
    delays = plan_delays(res.ticks)
    rec["plan_delay_ticks"] = {"p50": float(np.percentile(delays, 50)) if delays.size else float("nan"),
                               "max": float(delays.max()) if delays.size else float("nan")}
    return res, rec


def plan_delays(ticks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Ticks from each plan's observation to the first tick that acted on it (the episode's first plan, made before
    the first deadline, left out): the delay the plans act at, 1 when a plan is ready within the tick. The command
    age of a tick (``elapsed``) is that plus the ticks the plan has run since."""
    used = np.isin(np.asarray(ticks["source"]), (0, 1))
    plan, elapsed = np.asarray(ticks["plan_seq"])[used], np.asarray(ticks["elapsed"], np.float64)[used]
    first = np.r_[True, plan[1:] != plan[:-1]] if plan.size else np.zeros(0, bool)
    return elapsed[first][1:]


def _record(res: Any, rec: dict[str, Any], job: RobotJob, task: Any, seed: int, tally: _Tally,
            writer: Any) -> None:
    """Keep one episode's record and timings for the report, and hand its arrays to the recording (if any)."""
    tally.records.append(rec)
    tally.lateness.append(np.asarray(res.ticks["lateness"]))
    tally.ages.append(np.asarray(res.ticks["obs_age"]))
    src = np.asarray(res.ticks["source"])
    tally.elapsed.append(np.asarray(res.ticks["elapsed"], np.float64)[np.isin(src, (0, 1))])
    if writer is not None and res.length > 0:
        writer.put(episode_arrays(res, task), {
            "seed": seed, "success": rec["success"], "complete": rec["complete"],
            "end_reason": rec["end_reason"], "estop": rec["estop"], "robot": job.robot,
            "controller": job.controller.label(), "length": rec["ticks"]})


def _report(job: RobotJob, task: Any, spec: Any, out: Path, tally: _Tally, interrupted: bool) -> dict[str, Any]:
    """``report.json`` of a run: the job, the episode records and their aggregate."""
    lateness, elapsed, ages = tally.lateness, tally.elapsed, tally.ages
    delays = [r["plan_delay_ticks"]["p50"] for r in tally.records if np.isfinite(r["plan_delay_ticks"]["p50"])]
    return {
        "task": task.name, "robot": job.robot, "mode": job.mode, "addr": job.addr, "speed": float(spec.speed),
        "dt": float(spec.dt), "rate_hz": float(spec.speed / spec.dt), "controller": job.controller.as_dict(),
        "label": job.controller.label(), "ckpt": None if job.policy is None or not isinstance(job.policy, (str, Path))
        else str(job.policy), "seed": int(job.seed), "delay": int(job.delay), "rt_priority": job.rt_priority,
        "safety": {k: v for k, v in job.safety.__dict__.items()}, "interrupted": interrupted,
        "episodes": tally.records,
        "aggregate": aggregate(tally.records, np.concatenate(lateness) if lateness else np.zeros(0),
                               np.concatenate(elapsed) if elapsed else np.zeros(0),
                               np.concatenate(ages) if ages else np.zeros(0)),
        "plan_delay_ticks_p50": float(np.median(delays)) if delays else float("nan"),  # median of the episodes'
        "recorded": str(out / "episodes.zarr") if job.record else None,
    }


def _twin_stats(robot: Any, clear: bool = False) -> dict[str, Any] | None:
    try:
        return robot.stats(clear=clear)
    except RobotError:
        return None
