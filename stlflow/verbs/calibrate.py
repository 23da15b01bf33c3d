"""Fit the task rules' free parameters θ on demonstrations, per episode and dataset-wide.

    stlflow calibrate data=demos.zarr env=crossing [q=0.95] [margin=0.05] [params=[v_max,d_safe]]

Per episode: the tightest values of the parameters that the episode satisfies (``stlflow.stl.calibrate``, mode
"tightest"; bisection for thresholds, exhaustive scan for time bounds), loosened by a margin, so that every
demonstration satisfies its own specification. They are written into the store as the episode attribute
``stl_params`` ({name: value}); parameters that are not calibrated keep the task's defaults there.
Dataset-wide: the tightest values that a fraction q of the demonstrations satisfies (mode "dataset"), written
into the store attributes as ``stl_params_dataset`` (with ``stl_calibration``: q, margins, the parameters).
Prints a table per parameter (min / median / max) overall and per behaviour mode, and the notes of the
calibration (non-monotone parameters, episodes that do not satisfy their own θ).
"""

from __future__ import annotations

from stlflow.config import plain, run_job, verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("calibrate", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.control.jobs import CalibrateJob
    from stlflow.control.stl_data import calibrate

    def run() -> int:
        job = CalibrateJob(cfg.data, task=str(cfg.env.name), params=plain(cfg.params), margin=plain(cfg.margin),
                           q=float(cfg.q), stl=plain(cfg.stl))
        print(calibrate(job).text)
        return 0

    return run_job("calibrate", run)
