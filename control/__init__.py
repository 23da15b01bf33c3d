"""stlflow.control: the tasks, the typed jobs, and everything that runs a controller on a task.

- :mod:`stlflow.control.tasks` -- the task registry: one typed :class:`~stlflow.control.tasks.Task` per task
  (env id, θ names and resolver, metric readers, STL guidance model, augmentation), :func:`get_task`
- :mod:`stlflow.control.jobs` -- typed jobs (``CollectJob``, ``CalibrateJob``, ``AugmentJob``, ``TrainJob``,
  ``EvalJob``) and where their functions live; the verbs, the pipeline and the benchmarks all call those
- :mod:`stlflow.control.loop` -- :func:`run_episode`: an env and a controller in lock-step at the env's control
  rate, with an injected observation-to-action delay and a recorder hook (:class:`EpisodeResult`)
- :mod:`stlflow.control.recorder` -- :class:`EpisodeRecorder`: the loop's steps -> EpisodeStore episodes
- :mod:`stlflow.control.collect` -- :func:`collect`: scripted-expert demonstrations (``stlflow collect``)
- :mod:`stlflow.control.controllers` -- :class:`ControllerSpec` (a controller's name and options, validated where it
  is made) and the receding-horizon / full / cold k-step / one-step chunk controllers (the RTI controller itself
  is :class:`stlflow.policy.RTIController`)
- :mod:`stlflow.control.evaluate` -- closed-loop evaluation over seeds in worker processes, metrics, reports,
  plots, videos (``stlflow eval``); :func:`evaluation_callback` is the trainer's periodic evaluation
- :mod:`stlflow.control.stl_data` -- calibration and augmentation of stored demonstrations (``stlflow calibrate``,
  ``stlflow augment``); :mod:`stlflow.control.augment` the augmentation driver over a store
- :mod:`stlflow.control.training` -- :func:`train_policy` (``stlflow train``)
- :mod:`stlflow.control.samples` -- closed-loop samples per start state and the diversity measures
- :mod:`stlflow.control.workers` -- :func:`parallel_map`, the one worker pool (spawn, one thread per worker)
- :mod:`stlflow.control.robot` -- the ``Robot`` protocol a hardware driver implements (``RobotSpec``,
  ``Observation``); :mod:`stlflow.control.sim_robot` (a MuJoCo task in this process) and
  :mod:`stlflow.control.zmq_robot` (the client of the sim twin, :mod:`stlflow.control.twin`, ``stlflow serve-sim``)
- :mod:`stlflow.control.realtime` -- ``RealtimeLoop``: fixed-rate wall-clock (or virtual-clock) control of a
  ``Robot``, inference on its own thread (:mod:`stlflow.control.inference`), the safety layer
  (:mod:`stlflow.control.safety`)

Importing this package does not import torch; the controller, evaluation and training modules do.
"""

from stlflow.control.loop import Controller, EpisodeResult, run_episode
from stlflow.control.recorder import EpisodeRecorder

__all__ = ["Controller", "EpisodeRecorder", "EpisodeResult", "run_episode"]
