"""`auto` attention by measurement: time every kernel that can run a shape, check it, keep the fastest.

On the first use of a shape class (device, dtype, batch, query and key lengths rounded up to a
power of two, heads, head dim, key bias / padding) `AttentionSelector.choose` runs each candidate
kernel on the same inputs: one warm-up call, then `iterations` timed calls (each between device
synchronisations), and compares its output with a float32 reference computed on the first
`ACCURACY_ROWS` query rows. A candidate is accepted when its relative error (L2, on those rows)
is at most `EXACT_ERROR_FACTOR` times that of the reference kernel at the input's dtype (the STYLE
rule for fast paths), or `APPROXIMATE_ERROR_FACTOR` times for kernels that declare themselves
approximate (SageAttention). The fastest accepted candidate (median time) is the choice; it is
cached for the process. A candidate that raises (a kernel that cannot run this shape, out of
memory) is rejected with its error, never chosen, and the run goes on.

Every choice is reported as a trace event (`config.ATTENTION_CHOICE_EVENT`) with the kernel, its
measured time and TFLOP/s and every candidate's figures; a choice made earlier in the process is
reported again (marked `cached`) the first time each profiler sees it, so every report names the
kernel that ran. The selector is generic: `attention.py` gives it the candidates (its registry)
and the reference; tests give it fake candidates and a fake clock.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import ATTENTION_CHOICE_EVENT
from .trace import current_tracer, event

log = logging.getLogger(__name__)

ACCURACY_ROWS = 256  # query rows compared with the float32 reference
EXACT_ERROR_FACTOR = 2.0
APPROXIMATE_ERROR_FACTOR = 10.0
ERROR_FLOOR = 1e-6  # a float32 reference error can be ~0: allow float32 rounding
DEFAULT_ITERATIONS = 3


@dataclass(frozen=True)
class ShapeClass:
    """What decides which kernel is fastest: where, which dtype, and the attention's size."""

    device: str
    dtype: str
    batch: int
    query_bucket: int
    key_bucket: int
    num_heads: int
    head_dim: int
    key_bias: bool
    padded_keys: bool

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, *, key_bias: bool, padded_keys: bool) -> ShapeClass:
        """Shapes: q (B, Lq, N, Dh), k (B, Lk, N, Dh)."""
        b, lq, n, dh = q.shape
        return cls.for_sizes(q.device, q.dtype, batch=b, num_queries=lq, num_keys=k.shape[1], num_heads=n,
                             head_dim=dh, key_bias=key_bias, padded_keys=padded_keys)

    @classmethod
    def for_sizes(cls, device: torch.device, dtype: torch.dtype, *, batch: int, num_queries: int, num_keys: int,
                  num_heads: int, head_dim: int, key_bias: bool, padded_keys: bool) -> ShapeClass:
        return cls(device=str(torch.device(device)), dtype=str(dtype).removeprefix("torch."), batch=batch,
                   query_bucket=_bucket(num_queries), key_bucket=_bucket(num_keys), num_heads=num_heads,
                   head_dim=head_dim, key_bias=key_bias, padded_keys=padded_keys)

    def describe(self) -> str:
        extra = (", key bias" if self.key_bias else "") + (", padded keys" if self.padded_keys else "")
        return (f"B{self.batch} Lq<={self.query_bucket} Lk<={self.key_bucket} N{self.num_heads} "
                f"Dh{self.head_dim} {self.dtype} {self.device}{extra}")


def _bucket(length: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, length))))


@dataclass(frozen=True)
class Candidate:
    """One kernel to try: `run()` computes the attention of the prepared inputs (B, Lq, N, Dh)."""

    name: str
    run: Callable[[], torch.Tensor]
    exact: bool


@dataclass(frozen=True)
class Measurement:
    """What one candidate did: median seconds and relative error, or why it was rejected."""

    name: str
    seconds: float | None
    error: float | None
    rejected: str | None = None


@dataclass(frozen=True)
class Choice:
    """The kernel chosen for a shape class, its speed, and every candidate's figures."""

    shape: ShapeClass
    name: str
    seconds: float
    flops: float
    measurements: tuple[Measurement, ...]

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.seconds > 0 else float("nan")

    def facts(self, *, cached: bool) -> dict[str, str | float | bool]:
        def figure(m: Measurement) -> str:
            if m.rejected is not None:
                return f"{m.name}: rejected ({m.rejected})"
            return f"{m.name}: {m.seconds * 1e3:.3g} ms, rel. error {m.error:.2g}"

        return {"shape": self.shape.describe(), "kernel": self.name, "ms": self.seconds * 1e3,
                "tflops": self.tflops, "candidates": "; ".join(figure(m) for m in self.measurements),
                "cached": cached}


def attention_flops(q: torch.Tensor, k: torch.Tensor) -> float:
    """Multiply-adds x 2 of softmax attention: QK^T and PV. Shapes: q (B, Lq, N, Dh), k (B, Lk, N, Dh)."""
    b, lq, n, dh = q.shape
    return 4.0 * b * n * lq * k.shape[1] * dh


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))


class AttentionSelector:
    """Measures candidates per shape class and caches the choice (module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter, iterations: int = DEFAULT_ITERATIONS,
                 synchronize: Callable[[torch.device], None] | None = None) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1; got {iterations}")
        self._clock = clock
        self._iterations = iterations
        self._synchronize = synchronize or _synchronize
        self._choices: dict[ShapeClass, Choice] = {}
        self._told: dict[ShapeClass, weakref.WeakSet] = {}
        self._lock = threading.Lock()

    def cached(self, shape: ShapeClass) -> Choice | None:
        """The choice made for `shape`, reported to the current profiler if it has not seen it yet."""
        with self._lock:
            choice = self._choices.get(shape)
        if choice is not None:
            self._report(choice, cached=True)
        return choice

    def choose(self, shape: ShapeClass, candidates: Sequence[Candidate], *, reference_error: float,
               accuracy: Callable[[torch.Tensor], float], flops: float, device: torch.device) -> Choice:
        """The fastest accepted candidate for `shape` (measured now, or cached).

        `accuracy(out)` gives a candidate output's relative error against the float32 reference;
        `reference_error` is the reference kernel's own error at the input dtype.
        """
        choice = self.cached(shape)
        if choice is None:
            measurements = tuple(self._measure(c, reference_error, accuracy, device) for c in candidates)
            accepted = [m for m in measurements if m.rejected is None]
            if not accepted:
                raise RuntimeError(f"no attention kernel passed its check for {shape.describe()}: "
                                   + "; ".join(f"{m.name}: {m.rejected}" for m in measurements))
            best = min(accepted, key=lambda m: m.seconds)
            choice = Choice(shape=shape, name=best.name, seconds=best.seconds, flops=flops,
                            measurements=measurements)
            with self._lock:
                choice = self._choices.setdefault(shape, choice)
            log.info("attention 'auto' measured %s: %s (%.3g ms, %.1f TFLOP/s)", shape.describe(), choice.name,
                     choice.seconds * 1e3, choice.tflops)
            self._report(choice, cached=False)
        return choice

    def _report(self, choice: Choice, *, cached: bool) -> None:
        """Tell the current profiler about the choice once (each profiler sees every kernel used)."""
        tracer = current_tracer()
        if tracer is None:
            return
        with self._lock:
            told = self._told.setdefault(choice.shape, weakref.WeakSet())
            if tracer in told:
                return
            told.add(tracer)
        event(ATTENTION_CHOICE_EVENT, **choice.facts(cached=cached))

    def _measure(self, candidate: Candidate, reference_error: float, accuracy: Callable[[torch.Tensor], float],
                 device: torch.device) -> Measurement:
        try:
            out = candidate.run()  # warm-up (kernel selection, lazy initialisation)
            self._synchronize(device)
            error = accuracy(out)
            del out
            times = []
            for _ in range(self._iterations):
                start = self._clock()
                candidate.run()
                self._synchronize(device)
                times.append(self._clock() - start)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            # a third-party kernel that cannot run this shape (or runs out of memory) is not a candidate
            log.info("attention 'auto': %s rejected: %s", candidate.name, e)
            return Measurement(candidate.name, None, None, rejected=f"{type(e).__name__}: {str(e)[:120]}")
        factor = EXACT_ERROR_FACTOR if candidate.exact else APPROXIMATE_ERROR_FACTOR
        bound = factor * reference_error + ERROR_FLOOR
        seconds = statistics.median(times)
        if not math.isfinite(error) or error > bound:
            return Measurement(candidate.name, seconds, error,
                               rejected=f"relative error {error:.2g} > {bound:.2g} ({factor:g}x the reference's)")
        return Measurement(candidate.name, seconds, error)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
