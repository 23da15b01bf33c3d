"""The safety layer (control/safety.py) alone and in the loop on real MuJoCo tasks: clamp, rate limit, non-finite
actions, the stale-observation watchdog, the STL rule monitor, and the e-stop latch (signals, a lost robot, too many
fallbacks), with hold() on every way out."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from stlflow.control.realtime import ESTOP, FRESH, HOLD, EStopLatched, RealtimeLoop
from stlflow.control.robot import RobotSpec, hold_action
from stlflow.control.safety import RuleWatch, SafetyConfig, SafetyLayer
from stlflow.control.sim_robot import SimRobot
from stlflow.stl import parse

PICK = RobotSpec(obs_dim=22, action_dim=4, dt=0.1, action_low=(-0.3, -0.4, 0.0, -1.0),
                 action_high=(0.3, 0.4, 0.35, 1.0), discrete_action_mask=(False, False, False, True))


# ------------------------------------------------------------------------------------------ the action filter
def test_clamp_to_the_action_bounds_is_counted():
    layer = SafetyLayer()
    layer.begin(PICK, 0.1)
    a, clamped, limited, nonfinite = layer.filter([0.5, -0.1, -0.2, 1.0])
    np.testing.assert_array_equal(a, [0.3, -0.1, 0.0, 1.0])
    assert (clamped, limited, nonfinite) == (2, 0, False) and a.dtype == np.float64
    a, clamped, _, _ = layer.filter([0.1, 0.2, 0.3, -1.0])
    np.testing.assert_array_equal(a, [0.1, 0.2, 0.3, -1.0])
    assert clamped == 0
    assert layer.counters["clamped"] == 1 and layer.counters["clamped_channels"] == 2
    with pytest.raises(ValueError, match="3 channels"):
        layer.filter([0.0, 0.0, 0.0])


def test_rate_limit_per_channel_leaves_discrete_channels_alone():
    layer = SafetyLayer(rate_limit=[0.01, 0.02, 0.05, 0.01])
    layer.begin(PICK, 0.1)
    first, _, limited, _ = layer.filter([0.0, 0.0, 0.1, -1.0])
    assert limited == 0  # nothing sent before: nothing to limit against
    a, clamped, limited, _ = layer.filter([0.2, -0.3, 0.12, 1.0])  # the gripper flips: a discrete channel
    np.testing.assert_allclose(a, [0.01, -0.02, 0.12, 1.0])
    assert (clamped, limited) == (0, 2)
    b, _, limited, _ = layer.filter([0.2, -0.3, 0.5, 1.0])  # clamped to 0.35 first, then limited from 0.12
    np.testing.assert_allclose(b, [0.02, -0.04, 0.17, 1.0])
    assert limited == 3 and layer.counters["rate_limited"] == 2 and layer.counters["clamped"] == 1
    with pytest.raises(ValueError, match="rate_limit"):
        SafetyConfig(rate_limit=0.0)


def test_non_finite_actions_hold_and_are_counted():
    layer = SafetyLayer()
    layer.begin(PICK, 0.1)
    for bad in ([np.nan, 0, 0.1, 1], [0, np.inf, 0.1, 1], [0, 0, 0.1, -np.inf]):
        a, _, _, nonfinite = layer.filter(bad)
        assert a is None and nonfinite
    assert layer.counters["nonfinite"] == 3


class GoesNaN:
    """The Crossing expert, whose actions turn NaN from its ``n``-th call on (a diverging policy)."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def reset(self, seed=None, obs=None):
        self.inner.reset(seed=seed, obs=obs)

    def act(self, obs):
        self.calls += 1
        a = self.inner.act(obs)
        return np.full_like(a, np.nan) if self.calls >= self.n else a


def test_nan_actions_hold_the_robot_and_too_many_in_a_row_latch_the_estop():
    with SimRobot("crossing") as robot:
        loop = RealtimeLoop(robot, GoesNaN(robot.env.unwrapped.make_expert(0), 8), safety=SafetyConfig(max_fallbacks=5))
        res = loop.run(0, max_ticks=60)
        commands = np.stack(robot.trajectory["action"])
    src = res.ticks["source"].tolist()
    assert src == [FRESH] * 7 + [HOLD] * 4 + [ESTOP]  # the fifth held tick in a row latches the e-stop
    assert res.ticks["nonfinite"].tolist() == [False] * 7 + [True] * 5
    assert res.estop == "5 ticks in a row without a usable action (max_fallbacks=5)"
    assert res.counters["nonfinite"] == 5 and res.counters["max_fallbacks_in_row"] == 5
    assert np.isnan(res.action[7:]).all()  # nothing was sent on held ticks
    # the env stepped with Crossing's hold action (stop) from the first held tick on
    np.testing.assert_array_equal(commands[7:], np.zeros((len(commands) - 7, 2)))
    assert robot.stats["holds"] >= 6  # 4 holds, the e-stop, the way out


# ------------------------------------------------------------------------------------------ the watchdog
def test_watchdog_holds_then_latches_the_estop():
    layer = SafetyLayer(stale_after=0.25, estop_after=0.5)
    layer.begin(PICK, 0.1)
    assert [layer.watchdog(a) for a in (0.0, 0.25, 0.3, 0.75)] == ["ok", "ok", "hold", "hold"]
    assert not layer.latched
    assert layer.watchdog(0.76) == "estop" and layer.latched and layer.reason.startswith("stale observation")
    defaults = SafetyLayer()
    defaults.begin(PICK, 0.01)
    assert defaults.stale_after == pytest.approx(0.03) and defaults.estop_after == pytest.approx(0.1)


class DeadSensor(SimRobot):
    """A SimRobot whose observation stream stops after observation ``last`` (the env goes on stepping): a sensor
    link that died without an error."""

    def __init__(self, *args, last: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.last = last

    def observe(self, timeout):
        obs = super().observe(timeout)
        return obs if obs is None or obs.seq <= self.last else None


def test_stale_observations_hold_the_robot_then_latch_the_estop():
    with DeadSensor("crossing", last=4) as robot:
        cfg = SafetyConfig(stale_after=0.25, estop_after=0.5, max_fallbacks=None)
        res = RealtimeLoop(robot, robot.env.unwrapped.make_expert(0), safety=cfg).run(0, max_ticks=40)
    age = np.round(res.ticks["obs_age"], 9)
    # observations 0..4 fresh; then the last one ages one period per tick: 0.1, 0.2 still fine, hold above 0.25 s
    np.testing.assert_allclose(age, [0.0] * 5 + [0.1 * i for i in range(1, 9)])
    assert res.ticks["source"].tolist() == [FRESH] * 5 + [1, 1] + [HOLD] * 5 + [ESTOP]  # 1: the held plan
    assert res.ticks["stale"].tolist() == [False] * 7 + [True] * 6
    assert res.estop.startswith("stale observation: 0.800 s old")
    assert robot.stats["holds"] >= 7


# ------------------------------------------------------------------------------------------ the e-stop latch
class Interrupts:
    """The Crossing expert; on its ``n``-th call it sends the process ``sig`` (as Ctrl-C or a kill would)."""

    def __init__(self, inner, n: int, sig: int = signal.SIGINT) -> None:
        self.inner, self.n, self.sig, self.calls = inner, n, sig, 0
        self.handler_seen = None

    def reset(self, seed=None, obs=None):
        self.inner.reset(seed=seed, obs=obs)

    def act(self, obs):
        self.calls += 1
        if self.calls == self.n:
            self.handler_seen = signal.getsignal(self.sig)
            os.kill(os.getpid(), self.sig)
        return self.inner.act(obs)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_latches_the_estop_and_hold_runs_on_the_way_out(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with SimRobot("crossing") as robot:
        ctrl = Interrupts(robot.env.unwrapped.make_expert(0), 5, sig)
        loop = RealtimeLoop(robot, ctrl, handle_signals=True)
        res = loop.run(0, max_ticks=100)
        assert res.estop == signal.Signals(sig).name
        assert res.sources()[-1] == "estop" and res.length < 10
        assert robot.stats["holds"] >= 2  # on the e-stop tick and in the finally on the way out
        assert ctrl.handler_seen not in (before[sig], None)  # the loop's handler was in place during the run
        assert {s: signal.getsignal(s) for s in before} == before  # and the previous handlers are back
        # latched: no new run until it is cleared explicitly
        assert loop.estopped
        with pytest.raises(EStopLatched, match=signal.Signals(sig).name):
            loop.run(0, max_ticks=3)
        loop.reset_estop()
        loop.controller = robot.env.unwrapped.make_expert(0)
        again = loop.run(0, max_ticks=3)
    assert again.estop is None and again.length == 3


class LooksAtSIGINT:
    """The Crossing expert, noting the SIGINT handler in place at each call."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def reset(self, seed=None, obs=None):
        self.inner.reset(seed=seed, obs=obs)

    def act(self, obs):
        self.seen.append(signal.getsignal(signal.SIGINT))
        return self.inner.act(obs)


def test_signal_handlers_are_installed_only_when_asked():
    before = signal.getsignal(signal.SIGINT)
    with SimRobot("crossing") as robot:
        ctrl = LooksAtSIGINT(robot.env.unwrapped.make_expert(0))
        RealtimeLoop(robot, ctrl).run(0, max_ticks=3)  # handle_signals=False: the default
    assert len(ctrl.seen) == 3 and all(h is before for h in ctrl.seen)
    layer = SafetyLayer()
    with layer.signal_handlers():
        os.kill(os.getpid(), signal.SIGTERM)
    assert layer.reason == "SIGTERM" and signal.getsignal(signal.SIGINT) is before
    layer.begin(PICK, 0.1)
    assert layer.latched  # a new run does not clear it
    layer.reset_estop()
    assert not layer.latched and layer.reason is None


class ClosesTheRobot:
    """The Crossing expert, which shuts the robot's connection down on its ``n``-th call (a lost robot)."""

    def __init__(self, robot, n: int) -> None:
        self.robot, self.inner, self.n, self.calls = robot, robot.env.unwrapped.make_expert(0), n, 0

    def reset(self, seed=None, obs=None):
        self.inner.reset(seed=seed, obs=obs)

    def act(self, obs):
        self.calls += 1
        if self.calls == self.n:
            self.robot.close()
            return np.zeros(2, np.float32)
        return self.inner.act(obs)


def test_a_lost_robot_latches_the_estop():
    robot = SimRobot("crossing")
    robot.connect()
    res = RealtimeLoop(robot, ClosesTheRobot(robot, 4)).run(0, max_ticks=20)
    assert res.estop.startswith("robot lost:") and "closed" in res.estop
    assert res.length == 3 and res.counters["holds_on_exit"] == 1


# ------------------------------------------------------------------------------------------ rules
def test_rule_watch_monitors_invariants_at_once_and_bounded_rules_at_their_horizon():
    rules = ["G(speed <= {v_max})", "G(abs(lateral) <= 1)", "F[0,0.3](dist_goal <= 0.5)", "F(dist_goal <= 0)"]
    w = RuleWatch(" & ".join(rules), dt=0.1, params={"v_max": 1.0})
    speed, lateral, reach, never = (str(parse(r)) for r in rules)
    assert [text for text, _, _ in w.parts] == [speed, lateral, reach]
    assert w.unmonitored == [never]  # an unbounded eventually cannot be decided online
    sample = {"speed": 0.5, "lateral": 0.0, "dist_goal": 2.0}
    assert w.update(sample) == []
    assert w.update({**sample, "speed": 1.25}) == [(speed, -0.25, 1)]  # at once
    assert w.update(sample) == []
    found = w.update({**sample, "lateral": -1.5})  # sample 3: the reach window [0, 0.3] s closes too
    assert found == [(lateral, -0.5, 3), (reach, -1.5, 0)]
    assert w.update(sample) == []  # the bounded rule is decided once


def test_a_rule_violation_holds_the_robot():
    cfg = SafetyConfig(monitor=True, monitor_rules="G(speed <= {v_max})", monitor_params={"v_max": 0.4},
                       max_fallbacks=None)
    with SimRobot("crossing") as robot:
        res = RealtimeLoop(robot, robot.env.unwrapped.make_expert(0), safety=cfg).run(0, max_ticks=60)
        speeds = robot.env.unwrapped.signals(np.stack(robot.trajectory["obs"]))["speed"]
    violated = res.ticks["violation"]
    assert violated.any() and res.estop is None
    assert (res.ticks["source"][violated] == HOLD).all()
    assert (res.ticks["source"][~violated] != HOLD).all()
    # the ticks flagged are exactly those whose observation is over the limit (the monitor's robustness < 0)
    np.testing.assert_array_equal(violated, speeds[: res.length] > 0.4)
    assert res.counters["violations"] == int(violated.sum()) == len(res.violations)
    v = res.violations[0]
    assert v["rule"] == "G(speed <= {v_max})" and v["robustness"] == pytest.approx(0.4 - speeds[v["sample"]])
    # and the hold worked: the robot never got far past the limit (the drive brakes at 2 m/s^2)
    assert speeds.max() < 0.4 + 2.0 * 0.1 + 1e-6


# ------------------------------------------------------------------------------------------ hold actions
def test_hold_actions_of_the_tasks():
    from stlflow.envs.pickplace import OBS_INDEX

    obs = np.arange(22, dtype=np.float32)
    np.testing.assert_array_equal(hold_action("crossing", np.zeros(20)), [0.0, 0.0])
    np.testing.assert_array_equal(hold_action("pickplace", obs),
                                  np.concatenate([obs[OBS_INDEX["ee_target"]], obs[OBS_INDEX["grip_cmd"]]]))
    with pytest.raises(ValueError, match="no hold action known for task 'reacher'"):
        hold_action("reacher", obs)
