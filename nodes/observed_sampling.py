"""Denoising steps of samplers the pack does not run itself, as `Step_<i>_*` stages.

Two sources, both seen from outside the sampler:

- `WrappedRun`: one run of a ComfyUI core sampler (KSampler, KSamplerAdvanced, SamplerCustom...),
  fed by the model wrappers the model tap installs (`model_tap.py`). `Step_<i>_Loading` is the
  window in which ComfyUI loads / offloads models for the run (its PREPARE_SAMPLING); step i's
  `Step_<i>_Inference` runs from the first model evaluation after step i-1's callback to step i's
  callback (the solver update of a step therefore lands in the next one, and the callback itself,
  the latent preview, stays outside the steps). Each step states the expert (the model file the
  tap traced), the CFG mode seen in its model calls (one call holding cond and uncond = batched,
  two calls = sequential, no uncond = off) and its FLOPs from the DiT dims read off the loaded
  model and the shapes of each forward.
- `ProgressRun`: a sampler known only by its progress updates (kijai's WanVideoSampler, or a core
  sampler in a prompt that reached the server without the tap): a step runs from one update to the
  next, the first from the node's start (weight loading included). Updates that skip values
  (ComfyUI 0.3.76+ throttles them) make one stage of several steps, named `Steps_<a>-<b>_Inference`,
  which counts as no step: the run's step count is then `n/a` with that reason.

`StepNumbering` numbers steps across the runs of one prompt: a run that continues where another
ended (its first sigma is that run's last one, e.g. the low-noise KSamplerAdvanced after the
high-noise one) continues its numbering; otherwise numbering starts at 0 or after the steps
already numbered, with a note.

Shapes: `x` of a forward is (B, C, T, H, W); `context` is (B, S, text_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..wan_core.config import BATCHED_CFG, CFG_MIXED, CFG_OFF, SEQUENTIAL_CFG, step_stages

SIGMA_REL_TOL = 1e-5


class StepSink(Protocol):
    """What the runs need from the prompt's observation."""

    session: Any

    def note(self, text: str) -> None: ...

    def step_recorded(self, step: int | None, *, attributable: bool) -> None: ...


@dataclass(frozen=True)
class ModelLabel:
    """What the model tap traced for the model a sampler uses: the source node, its file, the expert."""

    source_node: str
    model_file: str
    expert: str

    @property
    def expert_name(self) -> str:
        """'high' / 'low' / 'model' when known, else the model file name (never empty)."""
        return self.expert or self.model_file or f"model of node {self.source_node}"


@dataclass(frozen=True)
class RunSpan:
    """Where one sampler run sat in the prompt's step numbering."""

    node_id: str
    offset: int
    num_steps: int
    first_sigma: float | None
    last_sigma: float | None


class StepNumbering:
    """Global step numbers across the sampler runs of one prompt."""

    def __init__(self) -> None:
        self.spans: list[RunSpan] = []

    def next_free(self) -> int:
        return max((s.offset + s.num_steps for s in self.spans), default=0)

    def place(
        self, node_id: str, first_sigma: float | None, *, starts_schedule: bool, earlier: list[RunSpan]
    ) -> tuple[int, str | None]:
        """(offset, note) for a run starting at `first_sigma`; `earlier` are runs of nodes ComfyUI
        served from its cache in this prompt (remembered from when they ran)."""
        if first_sigma is not None:
            for span in [*reversed(self.spans), *earlier]:
                if span.last_sigma is not None and math.isclose(
                    span.last_sigma, first_sigma, rel_tol=SIGMA_REL_TOL, abs_tol=1e-9
                ):
                    return span.offset + span.num_steps, None
        used = max([self.next_free(), *(s.offset + s.num_steps for s in earlier)])
        if used == 0:
            if starts_schedule or first_sigma is None:
                return 0, None
            return 0, (
                f"the steps of sampler node {node_id} start inside a schedule (first sigma {first_sigma:.4g}: "
                "denoise below 1 or a start step above 0) and no earlier sampler ended there; they are "
                "numbered from 0"
            )
        return used, (
            f"sampler node {node_id} does not continue an earlier sampler's schedule; its steps are "
            f"numbered after the {used} steps before it"
        )

    def add(self, span: RunSpan) -> None:
        self.spans.append(span)


@dataclass
class _Eval:
    """One model evaluation (a CALC_COND_BATCH) within a step: uncond present, forward batches."""

    has_uncond: bool
    calls: list[tuple[int, ...]] = field(default_factory=list)


def cfg_mode_of(evals: list[_Eval]) -> str | None:
    """CFG mode of a step from its evaluations; None when no evaluation was seen."""
    if not evals:
        return None
    guided = [e for e in evals if e.has_uncond]
    if not guided:
        return CFG_OFF
    modes = {BATCHED_CFG if any({0, 1} <= set(c) for c in e.calls) else SEQUENTIAL_CFG for e in guided}
    if len(guided) < len(evals):
        modes.add(CFG_OFF)
    return modes.pop() if len(modes) == 1 else CFG_MIXED


class WrappedRun:
    """The steps of one core sampler run, from the tap's wrappers (see the module docstring)."""

    def __init__(
        self, sink: StepSink, node_id: str, label: ModelLabel, sigmas: list[float], *, offset: int, cfg: float | None
    ) -> None:
        self.sink, self.node_id, self.label, self.sigmas, self.offset, self.cfg = (
            sink,
            node_id,
            label,
            sigmas,
            offset,
            cfg,
        )
        self.num_steps = max(len(sigmas) - 1, 0)
        self.done = 0  # steps whose callback arrived
        self.error: str | None = None
        self._frame: Any = None  # the open Step_<i>_Inference
        self._evals: list[_Eval] = []
        self._flops: float | None = 0.0
        self._flops_reason: str | None = None

    def _facts(self, local: int) -> dict[str, Any]:
        return {
            "sampler_node": self.node_id,
            "local_step": local,
            "expert": self.label.expert_name,
            "model_file": self.label.model_file or None,
            "cfg_scale": self.cfg,
            "sigma": self.sigmas[local] if local < len(self.sigmas) else None,
        }

    # -- loading ------------------------------------------------------------------------------
    def begin_loading(self) -> Any:
        name, kind = step_stages(self.offset)[0]
        return self.sink.session.open_stage(
            name, kind, **self._facts(0), what="ComfyUI loads and offloads models for this sampler run"
        )

    def end_loading(self, frame: Any, error: BaseException | None) -> None:
        self.sink.session.close_stage(frame, **({"error": type(error).__name__} if error else {}))

    # -- steps --------------------------------------------------------------------------------
    def model_evaluation(self) -> None:
        """A PREDICT_NOISE began: the current step's stage opens with its first evaluation."""
        if self._frame is None:
            local = self.done
            name, kind = step_stages(self.offset + local)[1]
            self._frame = self.sink.session.open_stage(name, kind)
            self._evals, self._flops, self._flops_reason = [], 0.0, None

    def cond_batch(self, has_uncond: bool) -> None:
        self._evals.append(_Eval(has_uncond=has_uncond))

    def model_call(self, cond_or_uncond: list[int] | None) -> None:
        if self._evals and cond_or_uncond is not None:
            self._evals[-1].calls.append(tuple(int(c) for c in cond_or_uncond))

    def forward(self, flops: float | None, reason: str | None) -> None:
        if flops is None:
            self._flops, self._flops_reason = None, reason
        elif self._flops is not None:
            self._flops += flops

    def step_done(self, local: int) -> None:
        """The sampler's callback for step `local` (0-based, within this run) arrived."""
        if self._frame is None:  # a callback without model evaluation (should not happen): nothing to time
            self.sink.note(f"sampler node {self.node_id} reported step {local} without a model evaluation")
            self.done = max(self.done, local + 1)
            return
        self._close(local, confirmed=True)
        self.done = max(self.done, local + 1)

    def _close(self, local: int, *, confirmed: bool, error: str | None = None) -> None:
        facts = self._facts(local)
        facts["cfg_mode"] = cfg_mode_of(self._evals)
        facts["flops"] = self._flops if self._flops else None
        if self._flops is None:
            facts["flops_unavailable"] = self._flops_reason
        if not confirmed:
            facts["unconfirmed"] = True
        if error:
            facts["error"] = error
        step = self.offset + local
        name = step_stages(step)[1][0]
        frame, self._frame = self._frame, None
        self.sink.session.close_stage(frame, name=name, **facts)
        self.sink.step_recorded(step, attributable=confirmed)

    def end(self, error: BaseException | None) -> RunSpan:
        """The run ended (normally or by an exception): close what is open, return its span."""
        if error is not None:
            self.error = type(error).__name__
        if self._frame is not None:
            self._close(self.done, confirmed=False, error=self.error)
            if self.error is None:
                self.sink.note(
                    f"sampler node {self.node_id} evaluated the model after its last step callback; that "
                    f"time is recorded as step {self.offset + self.done} (not confirmed by a callback)"
                )
        last = self.sigmas[self.done] if self.done < len(self.sigmas) else None
        return RunSpan(
            node_id=self.node_id,
            offset=self.offset,
            num_steps=self.done,
            first_sigma=self.sigmas[0] if self.sigmas else None,
            last_sigma=last,
        )


class ProgressRun:
    """Steps timed from a node's progress updates (see the module docstring)."""

    def __init__(self, sink: StepSink, node_id: str, *, offset: int, why: str) -> None:
        self.sink, self.node_id, self.offset, self.why = sink, node_id, offset, why
        self.done = 0
        self.merged = False
        self._frame: Any = self._open()

    def _open(self) -> Any:
        name, kind = step_stages(self.offset + self.done)[1]
        return self.sink.session.open_stage(name, kind)

    def cancel(self) -> None:
        """Steps come from another source after all (the model tap's wrappers)."""
        if self._frame is not None:
            self.sink.session.discard_stage(self._frame)
            self._frame = None

    def update(self, value: int, maximum: int) -> None:
        if self._frame is None or value <= self.done:
            return
        first, last = self.offset + self.done, self.offset + value - 1
        facts: dict[str, Any] = {"sampler_node": self.node_id, "timed_from": "progress updates", "why": self.why}
        if self.done == 0:
            facts["includes_loading"] = True  # the node's setup and weight loading come before step 0
        if last == first:
            name = step_stages(first)[1][0]
        else:
            name, self.merged = f"Steps_{first}-{last}_Inference", True
            facts["steps_in_stage"] = last - first + 1
        frame, self._frame = self._frame, None
        self.sink.session.close_stage(frame, name=name, **facts)
        self.sink.step_recorded(first if last == first else None, attributable=last == first)
        self.done = value
        if value < maximum:
            self._frame = self._open()

    def end(self) -> RunSpan:
        if self._frame is not None:
            if self.done == 0:
                self.cancel()  # no update at all: the node's time stays in the node, not in a step
                self.sink.note(
                    f"sampler node {self.node_id} sent no progress update: its time is not split into steps "
                    "(it shows as time inside a node, outside the stages)"
                )
            else:
                frame, self._frame = self._frame, None
                self.sink.session.close_stage(frame, unconfirmed=True, sampler_node=self.node_id)
                self.sink.step_recorded(self.offset + self.done, attributable=False)
        if self.merged:
            self.sink.note(
                f"progress updates of sampler node {self.node_id} skipped values (ComfyUI sends at most one "
                "every 100 ms), so some stages hold several steps; per-step figures of that node are partial"
            )
        return RunSpan(node_id=self.node_id, offset=self.offset, num_steps=self.done, first_sigma=None, last_sigma=None)
