"""Small pure statistics used by assembly and the figures: time-weighted means, percentiles, maxima."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .records import Sample

# A stage gets an activity figure only when the readings that overlap it describe mostly the stage:
# at least this share of the stage is covered, and at least this share of those readings' time
# lies inside it. A GPM or utilization reading averages over its whole interval, so a stage much
# shorter than the sampling interval would only inherit its neighbours' activity.
MIN_ACTIVITY_SHARE = 0.5


@dataclass(frozen=True, kw_only=True)
class ActivityFigures:
    mean_pct: float | None
    max_pct: float | None
    occupancy_mean_pct: float | None
    num_samples: int
    unmeasured_reason: str | None = None  # why mean_pct is None (None when measured or no GPU)


@dataclass(frozen=True)
class _Reading:
    value: float
    occupancy: float | None
    since: float
    t: float

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(self.t, end) - max(self.since, start))


def activity_readings(samples: Sequence[Sample]) -> list[_Reading]:
    """The activity readings among the samples, each with the interval it covers.

    A reading covers `(activity_since_s, t_s]`; samples from files that did not record the start
    cover the time since the previous sample (the older convention).
    """
    out: list[_Reading] = []
    previous_t: float | None = None
    for s in samples:
        t_prev, previous_t = previous_t, s.t_s
        if s.activity_pct is None:
            continue
        since = s.activity_since_s if s.activity_since_s is not None else t_prev
        if since is None or since >= s.t_s:
            continue  # the first sample of a run covers nothing before it
        out.append(_Reading(s.activity_pct, s.occupancy_pct, since, s.t_s))
    return out


def stage_activity(samples: Sequence[Sample], start: float, end: float) -> ActivityFigures:
    """Time-weighted mean and max activity over the stage [start, end] from the overlapping readings.

    Each reading's value covers its own interval (NVML GPM and utilization both report an average
    over an interval); a reading counts with the part of its interval inside the stage. When the
    readings overlapping the stage describe mostly other time (a stage shorter than the sampling
    interval, or a sampler starved during it) the stage has no figure: `mean_pct` is None and
    `unmeasured_reason` says why. A stage with no reading at all (no GPU) has no figure and no
    reason. Never 0 for "not measured".
    """
    duration = end - start
    readings = [r for r in activity_readings(samples) if r.overlap(start, end) > 0.0]
    if not readings or duration <= 0:
        return ActivityFigures(mean_pct=None, max_pct=None, occupancy_mean_pct=None, num_samples=0)
    inside = sum(r.overlap(start, end) for r in readings)
    spread = sum(r.t - r.since for r in readings)
    if inside < MIN_ACTIVITY_SHARE * duration or inside < MIN_ACTIVITY_SHARE * spread:
        reason = (f"too short for the activity readings: the {len(readings)} reading(s) overlapping the "
                  f"{duration:.3g} s stage average over {spread:.3g} s, of which {inside:.3g} s lie inside it")
        return ActivityFigures(mean_pct=None, max_pct=None, occupancy_mean_pct=None, num_samples=len(readings),
                               unmeasured_reason=reason)
    mean = sum(r.value * r.overlap(start, end) for r in readings) / inside
    # the readings mostly inside the stage (one exists since inside >= half the spread; the slack
    # absorbs float rounding)
    top = max(r.value for r in readings
              if r.overlap(start, end) >= MIN_ACTIVITY_SHARE * (r.t - r.since) * (1 - 1e-9))
    occ = [(r.occupancy, r.overlap(start, end)) for r in readings if r.occupancy is not None]
    occ_weight = sum(w for _, w in occ)
    occupancy = sum(v * w for v, w in occ) / occ_weight if occ_weight > 0 else None
    return ActivityFigures(mean_pct=mean, max_pct=top, occupancy_mean_pct=occupancy, num_samples=len(readings))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100]; got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty sequence")
    return sum(values) / len(values)


def time_weighted_mean(values: Iterable[tuple[float | None, float]]) -> float | None:
    """Mean of (value, seconds) pairs weighted by their seconds; pairs with no value or no time
    are left out, and with none left the mean is None (not measured), never 0."""
    known = [(value, seconds) for value, seconds in values if value is not None and seconds > 0]
    if not known:
        return None
    return sum(value * seconds for value, seconds in known) / sum(seconds for _, seconds in known)


def max_known(values: Iterable[int | None]) -> int | None:
    """The largest of the measured values, None when none was measured."""
    known = [v for v in values if v is not None]
    return max(known) if known else None
