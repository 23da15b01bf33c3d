"""STL robustness speed: stlflow.stl against rtamt and stlcg++ (each measured in this run when installed).

Workload (issue #3): 1,000 signals × 200 steps, ``G[0,50](x < 1) & F[0,100](y > 0.5)``, dt = 1.
Prints per-signal time of batched forward (ρ at sample 0, and the full trace) and forward+backward of ρ(0)
(exact and smooth), the online monitor's
time per update, rtamt's offline time per signal (with a value check against ours on every sample) and
stlcg++'s (PyTorch build, ``torch.vmap`` over the batch), and the ratios.

Second workload (trajectory optimisation, the augmentation engineer's shape): B = 240 trajectories × T = 250
steps, dt = 0.1, ``G(speed <= {v_max}) & G(clearance >= {d_safe}) & G(abs(lateral) <= {w}) &
F[0,{T}](dist_goal <= {eps})``, smooth τ = 30, forward+backward of ρ(0): ``robustness`` (point mode: each
top-level G/F reduces its operand over one window) against the former path ``robustness_trace(...)[:, 0]``
(full traces of the temporal operators), both in the same run, with the value and gradient differences.

    python benchmarks/stl_robustness.py [--batch 1000] [--steps 200] [--tau 10] [--threads 1] [--point-only]

rtamt and stlcgpp are not dependencies of stlflow; install them only to compare:
``pip install --no-deps rtamt stlcgpp`` (rtamt pins antlr4 4.7 but runs on hydra's 4.9 with a warning).
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import torch

from stlflow.control.workers import limit_threads
from stlflow.stl import parse

FORMULA = "G[0,50](x < 1) & F[0,100](y > 0.5)"


def timeit(fn, repeat: int, warmup: int = 2, stat=statistics.median) -> float:
    """Median wall time of fn() in seconds (median, not min: the machine this runs on is shared)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times)


def make_signals(B: int, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = 0.8 + 0.3 * np.cumsum(rng.normal(0, 0.1, (B, T)), 1) + rng.normal(0, 0.05, (B, T))
    y = 0.5 + 0.4 * np.sin(np.linspace(0, 6, T))[None] * rng.uniform(0.5, 1.5, (B, 1)) + rng.normal(0, 0.05, (B, T))
    return x, y


def bench_ours(spec, x, y, tau, repeat):
    B = x.shape[0]
    out = {}
    xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for label, smooth in (("exact", None), (f"smooth tau={tau:g}", tau)):
        with torch.no_grad():
            out[f"{label} forward"] = timeit(
                lambda smooth=smooth: spec.robustness({"x": xs, "y": ys}, 1.0, smooth=smooth), repeat) / B
            out[f"{label} full trace (B, T)"] = timeit(
                lambda smooth=smooth: spec.robustness_trace({"x": xs, "y": ys}, 1.0, smooth=smooth), repeat) / B

        def fwd_bwd(smooth=smooth):
            xg, yg = xs.clone().requires_grad_(True), ys.clone().requires_grad_(True)
            spec.robustness({"x": xg, "y": yg}, 1.0, smooth=smooth).sum().backward()

        out[f"{label} forward+backward"] = timeit(fwd_bwd, repeat) / B
    return out


def bench_monitor(spec, x, y, n_signals=20):
    """Per-update time over whole runs of the monitor (including the first h updates), and bound reads."""
    mon = spec.monitor(1.0)
    xs, ys = x[:n_signals].tolist(), y[:n_signals].tolist()
    trace = spec.robustness_trace({"x": x[:n_signals], "y": y[:n_signals]}, 1.0).numpy()
    times, ok = [], True
    for b in range(n_signals):
        mon.reset()
        samples = [{"x": a, "y": c} for a, c in zip(xs[b], ys[b])]
        t0 = time.perf_counter()
        outs = [mon.update(s) for s in samples]
        times.append((time.perf_counter() - t0) / len(samples))
        ok &= all(o.delayed == trace[b, o.delayed_t] for o in outs if o.delayed is not None)
    mon.reset()
    samples = [{"x": a, "y": c} for a, c in zip(xs[0], ys[0])]
    t0 = time.perf_counter()
    for s in samples:
        o = mon.update(s)
        o.lower, o.upper  # noqa: B018  (forces the lazy bounds)
    with_bounds = (time.perf_counter() - t0) / len(samples)
    return statistics.median(times), with_bounds, ok


def bench_rtamt(x, y, ours_trace, n_signals):
    try:
        import rtamt
    except ImportError:
        return None, "rtamt not installed (pip install --no-deps rtamt): skipped"
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        spec = rtamt.StlDiscreteTimeOfflineSpecification()
        spec.declare_var("x", "float")
        spec.declare_var("y", "float")
        spec.spec = "always[0,50](x < 1) and eventually[0,100](y > 0.5)"
        spec.parse()
    T = x.shape[1]
    t_axis = list(range(T))
    data = [({"time": t_axis, "x": x[b].tolist(), "y": y[b].tolist()}) for b in range(n_signals)]
    with redirect_stderr(io.StringIO()):
        spec.evaluate(data[0])
        t0 = time.perf_counter()
        results = [spec.evaluate(d) for d in data]
        per_signal = (time.perf_counter() - t0) / n_signals
    rt = np.array([[v for _, v in r] for r in results])
    diff = np.abs(rt - ours_trace[:n_signals])
    return per_signal, (f"max |rtamt - ours| over all {rt.size} samples of {n_signals} signals: {diff.max():.3g} "
                        f"(at t=0: {diff[:, 0].max():.3g})")


RTAMT_SAME = [  # rtamt text, ours: checked sample by sample (default strict Until, truncated windows)
    ("(x < 1) until[0,5] (y > 0.5)", "(x < 1) U[0,5] (y > 0.5)"),
    ("(x < 1) until[2,5] (y > 0.5)", "(x < 1) U[2,5] (y > 0.5)"),
    ("(x < 1) since[1,3] (y > 0.5)", "(x < 1) S[1,3] (y > 0.5)"),
    ("historically[0,3](x < 1) or once[2,4](y > 0.9)", "H[0,3](x < 1) | O[2,4](y > 0.9)"),
    ("always(x < 1.5) -> eventually[3,7](y > 0.9)", "G(x < 1.5) -> F[3,7](y > 0.9)"),
]


def check_rtamt_semantics(x, y, n_signals=20):
    """Other operators, including the end of the signal, sample by sample against rtamt."""
    import rtamt

    lines = []
    for rt_text, text in RTAMT_SAME:
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            spec = rtamt.StlDiscreteTimeOfflineSpecification()
            spec.declare_var("x", "float")
            spec.declare_var("y", "float")
            spec.spec = rt_text
            spec.parse()
            ref = np.array([[v for _, v in spec.evaluate({"time": list(range(x.shape[1])), "x": x[b].tolist(),
                                                          "y": y[b].tolist()})] for b in range(n_signals)])
        ours = parse(text).robustness_trace({"x": x[:n_signals], "y": y[:n_signals]}, 1.0).numpy()
        with np.errstate(invalid="ignore"):
            diff = np.where(ref == ours, 0.0, np.abs(ref - ours))  # equal infinities (empty windows) count as equal
        n_inf = int(np.isinf(ref).sum())
        lines.append(f"{text:<34s} max |rtamt - ours| over {ref.size} samples: {np.nanmax(diff):.3g} "
                     f"(mismatches: {int((diff != 0).sum())}; {n_inf} samples are ±inf in both)")
    return lines


def bench_stlcgpp(x, y, tau, repeat, n_signals, ours_rho):
    try:
        from stlcgpp.formula import Always, And, Eventually, GreaterThan, LessThan, Predicate
    except ImportError:
        return {}, ["stlcg++ not installed (pip install --no-deps stlcgpp): skipped"]
    px = Predicate("x", lambda s: s[..., 0])
    py = Predicate("y", lambda s: s[..., 1])
    formula = And(Always(LessThan(px, 1.0), interval=[0, 50]), Eventually(GreaterThan(py, 0.5), interval=[0, 100]))
    sig = torch.tensor(np.stack([x[:n_signals], y[:n_signals]], -1), dtype=torch.float32)  # (B, T, 2)
    out, notes = {}, []
    for label, kwargs in (("exact", {}), (f"smooth tau={tau:g}", {"approx_method": "logsumexp", "temperature": tau})):
        def rob(s, kwargs=kwargs):
            return torch.vmap(lambda one: formula.robustness(one, **kwargs))(s)

        try:
            with torch.no_grad():
                values = rob(sig)
                out[f"{label} forward"] = timeit(lambda: rob(sig), repeat) / n_signals

            def fwd_bwd(rob=rob):
                s = sig.clone().requires_grad_(True)
                rob(s).sum().backward()

            out[f"{label} forward+backward"] = timeit(fwd_bwd, repeat) / n_signals
            ours = ours_rho[label][:n_signals]
            diff = (values.double() - torch.as_tensor(ours)).abs().max()
            notes.append(f"max |stlcg++ - ours| {label} rho(0) over {n_signals} signals: {float(diff):.3g}")
        except Exception as err:  # report, do not hide: a comparison that fails is a finding
            notes.append(f"stlcg++ {label} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return out, notes


OPT_FORMULA = ("G(speed <= {v_max}) & G(clearance >= {d_safe}) & G(abs(lateral) <= {w}) & "
               "F[0,{T}](dist_goal <= {eps})")


def bench_point_mode(repeat: int, B: int = 240, T: int = 250, tau: float = 30.0, dt: float = 0.1) -> None:
    """ρ(0) forward+backward in point mode vs robustness_trace(...)[:, 0], same inputs, same run."""
    from stlflow.stl.semantics import robustness, robustness_trace

    spec = parse(OPT_FORMULA)
    gen = torch.Generator().manual_seed(0)
    base = {"speed": 0.8 + 0.3 * torch.rand(B, T, generator=gen), "clearance": 0.5 + torch.rand(B, T, generator=gen),
            "lateral": 0.2 * torch.randn(B, T, generator=gen),
            "dist_goal": torch.linspace(3.0, 0.0, T).expand(B, T) + 0.1 * torch.rand(B, T, generator=gen)}
    params = {"v_max": torch.full((B,), 1.0), "d_safe": 0.3, "w": 0.5, "T": 20.0, "eps": 0.2}
    print(f"\ntrajectory optimisation shape: {spec}\n  B = {B}, T = {T}, dt = {dt:g}, float32, "
          f"forward+backward of rho(0) w.r.t. all signals (time per batch):")
    results = {}
    for label, smooth in ((f"smooth tau={tau:g}", tau), ("exact", None)):
        for path, fn in (("point mode: robustness()", robustness),
                         ("old: robustness_trace()[:, 0]", lambda *a, **k: robustness_trace(*a, **k)[:, 0])):
            def fwd_bwd(fn=fn, smooth=smooth):
                sig = {k: v.clone().requires_grad_(True) for k, v in base.items()}
                rho = fn(spec, sig, dt, params, smooth=smooth)
                grads = torch.autograd.grad(rho.sum(), list(sig.values()))
                return rho.detach(), grads

            with torch.no_grad():
                fwd = timeit(lambda fn=fn, smooth=smooth: fn(spec, base, dt, params, smooth=smooth), repeat)
            fb_min = timeit(fwd_bwd, repeat, stat=min)  # min as well: on a shared machine the median drifts
            results[(label, path)] = (timeit(fwd_bwd, repeat), fwd, fb_min, fwd_bwd())
        (tp, fp, mp, (rp, gp)), (to, fo, mo, (ro, go)) = (
            results[(label, p)] for p in ("point mode: robustness()", "old: robustness_trace()[:, 0]"))
        dv = float((rp - ro).abs().max())
        dg = max(float((a - b).abs().max()) for a, b in zip(gp, go))
        print(f"  {label:<10s} fwd+bwd median: point mode {tp * 1e3:6.2f} ms, old {to * 1e3:6.2f} ms -> {to / tp:5.1f}x"
              f" | min: {mp * 1e3:6.2f} vs {mo * 1e3:6.2f} ms -> {mo / mp:5.1f}x | forward median: "
              f"{fp * 1e3:6.2f} vs {fo * 1e3:6.2f} ms -> {fo / fp:5.1f}x | max |drho| {dv:.2g}, max |dgrad| {dg:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tau", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rtamt-signals", type=int, default=50)
    ap.add_argument("--stlcg-signals", type=int, default=1000)
    ap.add_argument("--point-only", action="store_true", help="only the trajectory-optimisation (point mode) rows")
    args = ap.parse_args()
    limit_threads(args.threads)
    if args.point_only:
        bench_point_mode(args.repeat)
        return
    spec = parse(FORMULA)
    x, y = make_signals(args.batch, args.steps)
    print(f"formula: {spec}   signals: {args.batch} x {args.steps}   dt = 1   torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), CPU")
    ours = bench_ours(spec, x, y, args.tau, args.repeat)
    with torch.no_grad():
        ours_trace = spec.robustness_trace({"x": x, "y": y}, 1.0).numpy()  # float64 for the value checks
    print("\nstlflow.stl (batched, float32), time per signal:")
    for k, v in ours.items():
        print(f"  {k:<36s} {v * 1e6:9.2f} us")
    per_update, with_bounds, ok = bench_monitor(spec, x, y)
    print(f"  online monitor update (delayed value)  {per_update * 1e6:9.2f} us per step   "
          f"(delayed == offline: {ok})")
    print(f"  online update + reading lower/upper    {with_bounds * 1e6:9.2f} us per step   "
          f"(bounds are re-evaluated only during the first h = {spec.horizon(1.0)} steps)")

    rt, note = bench_rtamt(x, y, ours_trace, min(args.rtamt_signals, args.batch))
    print("\nrtamt (offline, discrete time, one signal per call):")
    if rt is None:
        print(f"  {note}")
    else:
        print(f"  offline evaluation per signal          {rt * 1e6:9.2f} us")
        print(f"  {note}")
        full = ours["exact full trace (B, T)"]
        print(f"  ratio rtamt / stlflow, same output (full robustness trace): {rt / full:.0f}x")
        print(f"  ratio rtamt / stlflow, rho(0) only (stlflow reads the first h+1 samples): "
              f"{rt / ours['exact forward']:.0f}x")
        print("  same semantics on other operators (whole traces, end of signal included):")
        for line in check_rtamt_semantics(x, y):
            print(f"    {line}")

    with torch.no_grad():
        ours_rho = {"exact": ours_trace[:, 0],
                    f"smooth tau={args.tau:g}": spec.robustness({"x": x, "y": y}, 1.0, smooth=args.tau).numpy()}
    sc, notes = bench_stlcgpp(x, y, args.tau, max(3, args.repeat // 2), min(args.stlcg_signals, args.batch), ours_rho)
    print("\nstlcg++ (PyTorch, torch.vmap over the batch, float32), time per signal:")
    for k, v in sc.items():
        print(f"  {k:<36s} {v * 1e6:9.2f} us   (stlflow is {v / ours[k]:.1f}x faster)")
    for n in notes:
        print(f"  {n}")
    bench_point_mode(args.repeat)
    if not math.isfinite(ours["exact forward"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
