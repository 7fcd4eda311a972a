"""Small pure statistics used by assembly and the figures: time-weighted means, percentiles, maxima."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .records import Sample


@dataclass(frozen=True, kw_only=True)
class ActivityFigures:
    mean_pct: float | None
    max_pct: float | None
    occupancy_mean_pct: float | None
    num_samples: int


def stage_activity(samples: Sequence[Sample], start: float, end: float) -> ActivityFigures:
    """Time-weighted mean and max of the activity samples covering (start, end].

    Each sample's value covers the time since the previous sample (NVML GPM and utilization
    both report over an interval); the part of that interval before `start` is not counted.
    A stage with no covering sample has no activity figure (None), never 0.
    """
    weighted = occ_weighted = weight = occ_weight = 0.0
    values: list[float] = []
    previous_t: float | None = None
    for s in samples:
        t_prev, previous_t = previous_t, s.t_s
        if not start < s.t_s <= end or s.activity_pct is None:
            continue
        lo = start if t_prev is None else max(t_prev, start)
        dt = s.t_s - lo
        values.append(s.activity_pct)
        weighted += s.activity_pct * dt
        weight += dt
        if s.occupancy_pct is not None:
            occ_weighted += s.occupancy_pct * dt
            occ_weight += dt
    if not values:
        return ActivityFigures(mean_pct=None, max_pct=None, occupancy_mean_pct=None, num_samples=0)
    mean = weighted / weight if weight > 0 else sum(values) / len(values)
    occupancy = occ_weighted / occ_weight if occ_weight > 0 else None
    return ActivityFigures(
        mean_pct=mean, max_pct=max(values), occupancy_mean_pct=occupancy, num_samples=len(values)
    )


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
