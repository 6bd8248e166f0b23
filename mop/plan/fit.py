"""`mop plan fit`: the in-step efficiency of each term, fitted to measured step times.

A micro-benchmark times one kernel alone, synchronised around each call; a training step runs the
same kernels at other shapes, between others, beside collectives that take SMs and memory
bandwidth. The calibration keeps the measured rates as measured and the time model multiplies each
by its term's in-step efficiency (`calibration.EFFICIENCIES`: attention, expert GEMM, dense GEMM,
memory-bound work, collective links). This module fits those factors:

* Points: every measured mop step of the calibration's device type in the accuracy corpus
  (`accuracy.accuracy_rows`: bench results.json files and the report points entered by hand),
  less the sources in `accuracy.FIT_EXCLUDED` (code whose cost the model does not describe), each
  with the reason. A point's configuration (its policies, the optimizer's device share) is
  predicted once with the given calibration and then held fixed.
* Objective: the sum of squared log errors of the predicted step time, each factor bounded to
  `BOUNDS`, from 1.0: a projected Gauss-Newton on the log factors with a finite-difference
  Jacobian and a halving step. No randomness: the same input gives the same factors, bit for bit.
* Which factors: forward selection by leave-one-out error. From none, each round tries every
  remaining term and keeps the one whose fit predicts left-out points best (RMS log error); the
  rounds stop when the best gains less than `MIN_GAIN`. A term the measured steps do not determine
  stays 1.0, the micro-benchmark as measured. `terms=` fits a given set instead.
* Leave-one-out: each point predicted by the factors fitted without it, reported beside the
  in-sample error, so that a fit is not mistaken for a prediction.

The result is the calibration with the fitted factors and a `fit` record: the terms, the points
(and those left out, with why), the selection rounds, the in-sample and leave-one-out errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from mop.plan.calibration import EFFICIENCIES, Calibration
from mop.plan.step import Step
from mop.plan.timing import estimate_time

BOUNDS = (0.2, 1.2)  # a step gets at most a fifth of its micro-benchmark and not much more than all of it
MIN_GAIN = 0.005  # a term joins the fit when it lowers the leave-one-out RMS log error by this much (0.5%)
TARGET = 0.15  # the time target: within 15%
_DX = 1e-6  # finite-difference step in log factor
_MAX_ITER = 60

METHOD = (f"least squares on log step time; factors bounded to [{BOUNDS[0]}, {BOUNDS[1]}]; terms chosen by forward "
          f"selection on the leave-one-out RMS log error (a term joins when it lowers it by at least {MIN_GAIN})")


@dataclass(frozen=True)
class FitPoint:
    """One measured step: where from (`key`), the configuration predicted for it, its measured seconds."""

    key: str
    step: Step
    device_fraction: float
    measured_s: float


def point_keys(rows: list[dict]) -> list[str]:
    """Each measured point's name in the fit record: source, context and configuration (#2, #3 for repeats)."""
    keys, seen = [], set()
    for r in rows:
        base = key = f"{r['source']} {r['context'] // 1024}K {r['config']}"
        n = 2
        while key in seen:
            key, n = f"{base} #{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def fit_points(rows: list[dict], cal: Calibration) -> tuple[list[FitPoint], dict[str, str]]:
    """(the points a fit uses, {point: why it is left out}) from `accuracy_rows` of the calibration's device type."""
    from mop.plan.accuracy import fit_exclusion

    points, excluded = [], {}
    for r, key in zip(rows, point_keys(rows)):
        if not r["step_meas"]:  # a memory-only point: no time to fit
            continue
        why = fit_exclusion(r["source"])
        if not why and cal.device_name.lower() not in (r["device"] or "").lower():
            why = f"measured on {r['device'] or 'an unrecorded device'}, not {cal.device_name}"
        if why:
            excluded[key] = why
            continue
        points.append(FitPoint(key, r["step"], r["device_fraction"], r["step_meas"]))
    return points, excluded


def log_errors(points: list[FitPoint], cal: Calibration) -> np.ndarray:
    """log(predicted / measured) step time of each point."""
    return np.array([math.log(estimate_time(p.step, cal, device_fraction=p.device_fraction).step / p.measured_s)
                     for p in points])


def _raw(cal: Calibration) -> Calibration:
    """The calibration with every efficiency 1.0: the micro-benchmarks as measured."""
    return cal.with_efficiencies({t: 1.0 for t in EFFICIENCIES})


def _at(raw: Calibration, terms: tuple[str, ...], x: np.ndarray) -> Calibration:
    return raw.with_efficiencies({t: math.exp(v) for t, v in zip(terms, x)})


def fit_factors(points: list[FitPoint], cal: Calibration, terms: tuple[str, ...],
                start: dict[str, float] | None = None) -> dict[str, float]:
    """The efficiencies of `terms` that minimise the squared log errors of `points` (the other terms at 1.0).

    Projected Gauss-Newton on log factors inside `BOUNDS`: a factor at a bound whose gradient points
    out of the box is held there; the step is halved until the error falls. `start`: where to begin
    (1.0 by default; leave-one-out starts from the full fit, which changes the path, not the optimum).
    """
    if not terms or not points:
        return {}
    raw = _raw(cal)
    lo, hi = math.log(BOUNDS[0]), math.log(BOUNDS[1])
    x = np.zeros(len(terms)) if start is None else np.clip(np.log([start[t] for t in terms]), lo, hi)
    r = log_errors(points, _at(raw, terms, x))
    cost = float(r @ r)
    for _ in range(_MAX_ITER):
        J = np.empty((len(points), len(terms)))
        for k in range(len(terms)):
            xk = x.copy()
            xk[k] += _DX
            J[:, k] = (log_errors(points, _at(raw, terms, xk)) - r) / _DX
        g = J.T @ r
        free = ~(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)))
        if not free.any():
            break
        dx = np.zeros_like(x)
        dx[free] = np.linalg.lstsq(J[:, free], -r, rcond=None)[0]
        step, improved = 1.0, False
        while step > 1e-6:
            xn = np.clip(x + step * dx, lo, hi)
            rn = log_errors(points, _at(raw, terms, xn))
            cn = float(rn @ rn)
            if cn < cost:
                improved = True
                break
            step /= 2
        if not improved:
            break
        gain = cost - cn
        x, r, cost = xn, rn, cn
        if gain <= 1e-12 * cost + 1e-15:
            break
    return {t: float(math.exp(v)) for t, v in zip(terms, x)}


def leave_one_out(points: list[FitPoint], cal: Calibration, terms: tuple[str, ...],
                  start: dict[str, float] | None = None) -> np.ndarray:
    """Each point's log error predicted by the factors of `terms` fitted on the other points."""
    raw = _raw(cal)
    out = np.empty(len(points))
    for i, p in enumerate(points):
        factors = fit_factors(points[:i] + points[i + 1:], cal, terms, start)
        out[i] = log_errors([p], raw.with_efficiencies(factors))[0]
    return out


def leave_one_out_by_point(rows: list[dict], cal: Calibration) -> dict[str, float]:
    """{point: leave-one-out log error} for the points `cal` was fitted on, refitting its fitted terms
    without each in turn; empty for a calibration `mop plan fit` did not produce."""
    if not cal.fit or "fitted" not in cal.fit or "carried_over" in cal.fit:
        return {}
    fitted = cal.fit["fitted"]
    points, _ = fit_points(rows, cal)
    errors = leave_one_out(points, cal, tuple(fitted), fitted)
    return {p.key: float(e) for p, e in zip(points, errors)}


def rms(errors: np.ndarray) -> float:
    """Root mean square of log errors."""
    return float(np.sqrt(np.mean(np.square(errors)))) if len(errors) else 0.0


def select_terms(points: list[FitPoint], cal: Calibration, candidates: tuple[str, ...] = tuple(EFFICIENCIES)
                 ) -> tuple[tuple[str, ...], list[dict]]:
    """(the terms forward selection keeps, its rounds: each term tried and its leave-one-out RMS log error)."""
    chosen: tuple[str, ...] = ()
    best = rms(log_errors(points, _raw(cal)))  # no factor fitted: nothing to leave out
    rounds = [dict(terms=[], loo_rms=best)]
    while len(chosen) < len(candidates):
        tried = {t: rms(leave_one_out(points, cal, chosen + (t,))) for t in candidates if t not in chosen}
        term = min(tried, key=lambda t: (tried[t], candidates.index(t)))
        joins = best - tried[term] >= MIN_GAIN
        rounds.append(dict(tried=tried, best=term, joins=joins))
        if not joins:
            break
        chosen, best = chosen + (term,), tried[term]
    return chosen, rounds


def summary(errors: np.ndarray) -> dict:
    """RMS log error, the largest relative error, and how many points are within `TARGET`."""
    rel = np.expm1(errors)
    return dict(rms_log=round(rms(errors), 4), max_abs_err=round(float(np.abs(rel).max()), 4) if len(rel) else 0.0,
                within_15=f"{int((np.abs(rel) <= TARGET).sum())} of {len(rel)}")


@dataclass(frozen=True)
class FitResult:
    """The fitted calibration and what stands behind it (errors are log(predicted / measured) per point)."""

    calibration: Calibration
    terms: tuple[str, ...]
    points: list[FitPoint]
    excluded: dict[str, str]
    before: np.ndarray  # with the input calibration as it was
    in_sample: np.ndarray
    loo: np.ndarray
    rounds: list[dict] = field(default_factory=list)


def fit_calibration(cal: Calibration, rows: list[dict], terms: tuple[str, ...] | None = None,
                    base: str = "") -> FitResult:
    """Fit `cal`'s efficiencies to the measured steps among `rows` (`accuracy_rows`); `terms=None`:
    forward selection chooses them. `base`: what the input was (recorded)."""
    points, excluded = fit_points(rows, cal)
    if not points:
        raise ValueError(f"no measured step of a {cal.device_name} to fit on ({len(excluded)} left out)")
    unknown = sorted(set(terms or ()) - set(EFFICIENCIES))
    if unknown:
        raise ValueError(f"efficiency terms {unknown} unknown; known: {list(EFFICIENCIES)}")
    rounds: list[dict] = []
    if terms is None:
        terms, rounds = select_terms(points, cal)
    terms = tuple(t for t in EFFICIENCIES if t in terms)  # canonical order
    factors = {t: round(f, 4) for t, f in fit_factors(points, cal, terms).items()}
    fitted = _raw(cal).with_efficiencies(factors)
    in_sample = log_errors(points, fitted)
    loo = leave_one_out(points, cal, terms, factors)
    record = dict(method=METHOD, base=base, fitted=factors,
                  not_fitted=[t for t in EFFICIENCIES if t not in terms],
                  at_bound=[t for t, f in factors.items() if f in BOUNDS],
                  in_sample=summary(in_sample), leave_one_out=summary(loo),
                  selection=[_round_entry(r) for r in rounds], points=[p.key for p in points],
                  excluded=_by_reason(excluded))
    return FitResult(replace(fitted, fit=record), terms, points, excluded, log_errors(points, cal), in_sample, loo,
                     rounds)


def _by_reason(excluded: dict[str, str]) -> dict[str, list[str]]:
    """{why: [points]}: the record names each reason once."""
    out: dict[str, list[str]] = {}
    for key, why in excluded.items():
        out.setdefault(why, []).append(key)
    return out


def _round_entry(entry: dict) -> dict:
    if "tried" not in entry:
        return dict(terms=entry["terms"], loo_rms=round(entry["loo_rms"], 4))
    return dict(tried={t: round(v, 4) for t, v in entry["tried"].items()}, best=entry["best"], joins=entry["joins"])


def render(result: FitResult) -> str:
    """The fit as Markdown: factors, selection rounds, and every point before, in sample and left out."""
    cal, rec = result.calibration, result.calibration.fit
    out = [f"In-step efficiencies of {cal.device_name} ({cal.name}), fitted on {len(result.points)} measured steps "
           f"({len(result.excluded)} left out). Method: {METHOD}.", "",
           "| term | efficiency | measured rate | rate in a step |", "|---|---|---|---|"]
    for term, (name, rates) in EFFICIENCIES.items():
        f = getattr(cal, name)
        rate = getattr(cal, rates[0])
        unit = "TFLOP/s" if rates[0].endswith("flops") else "GB/s"
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        state = "" if term in result.terms else " (not fitted)"
        out.append(f"| {term} | {f:.4f}{state} | {rates[0]} {rate / scale:,.0f} {unit} | {rate * f / scale:,.0f} |")
    if result.rounds:
        out += ["", "Forward selection (leave-one-out RMS log error of each term added to those kept):", ""]
        for i, r in enumerate(result.rounds):
            if "tried" not in r:
                out.append(f"- start, no factor: {r['loo_rms']:.4f}")
            else:
                tried = ", ".join(f"{t} {v:.4f}" for t, v in r["tried"].items())
                out.append(f"- round {i}: {tried}; {r['best']} {'joins' if r['joins'] else 'gains too little: stop'}")
    if rec["at_bound"]:
        out += ["", f"At a bound of {BOUNDS}: {', '.join(rec['at_bound'])} (the data want more; treat with care)."]
    out += ["", "| point | measured s | input calibration | in sample | leave-one-out |", "|---|---|---|---|---|"]
    for p, b, e, l in zip(result.points, result.before, result.in_sample, result.loo):
        out.append(f"| {p.key} | {p.measured_s:.3f} | {math.expm1(b):+.1%} | {math.expm1(e):+.1%} | {math.expm1(l):+.1%} |")
    for name, errs in (("input calibration", result.before), ("in sample", result.in_sample),
                       ("leave-one-out", result.loo)):
        s = summary(errs)
        out.append(f"\n{name}: RMS log error {s['rms_log']:.3f}, largest {s['max_abs_err']:.1%}, within 15%: "
                   f"{s['within_15']}")
    for why, keys in _by_reason(result.excluded).items():
        out += ["", f"Left out ({why}):"] + [f"- {k}" for k in keys]
    return "\n".join(out)
