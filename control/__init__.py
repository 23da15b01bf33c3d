"""stlflow.control: the control loop and everything that runs a controller on a task (see DESIGN.md).

- :mod:`stlflow.control.loop` -- :func:`run_episode`: an env and a controller in lock-step at the env's control
  rate, with an injected observation-to-action delay and a recorder hook (:class:`EpisodeResult`)
- :mod:`stlflow.control.recorder` -- :class:`EpisodeRecorder`: the loop's steps -> EpisodeStore episodes
- :mod:`stlflow.control.collect` -- :func:`collect`: scripted-expert demonstrations (``stlflow collect``)
- :mod:`stlflow.control.controllers` -- receding-horizon / full / cold k-step / one-step chunk controllers and
  :func:`make_controller` (the RTI controller itself is :class:`stlflow.policy.RTIController`)
- :mod:`stlflow.control.evaluate` -- closed-loop evaluation over seeds in worker processes, metrics, reports,
  plots, videos (``stlflow eval``); :func:`evaluate_policy` is the trainer's periodic-evaluation callback

Importing this package does not import torch; the controller and evaluation modules do.
"""

from stlflow.control.loop import Controller, EpisodeResult, run_episode
from stlflow.control.recorder import EpisodeRecorder

__all__ = ["Controller", "EpisodeRecorder", "EpisodeResult", "run_episode"]
