"""The live view of a running prompt: current stage, SM activity (or GPU busy), VRAM, CPU and RSS.

While a profiling session is open, `LiveView` listens to its samples (`ProfileSession.add_listener`;
the session's own sampler thread takes them, no thread of its own) and sends at most one
`wanbench.live` websocket message every `MIN_INTERVAL_S` seconds through `comfy_bridge` (the
newest figures measured since the previous message: a stage shorter than the interval may not
show) and a last one when the session ends. The workflow observer attaches it when it opens a
prompt's session and the observation detaches it when it closes the session, whichever path
closes it (the report, the end of the prompt, the next prompt). The Wan Profiler node in the UI
(`web/wanbench.js`) shows the stage and draws a small trace of each series. Sending is a dict and a
thread-safe queue put: no measurable cost, and nothing at all outside ComfyUI (no listener is
attached there unless a sender is given, as the tests do).

Message `wanbench.live`, `data`:
    {"node": <Wan Profiler node id>, "state": "running" | "done", "t": seconds since the session
     opened, "stage": name or null, "activity": % or null, "activity_label": "SM activity" |
     "GPU busy" | null, "vram_gb": GB or null, "cpu_pct": % or null, "rss_gb": GB or null}
A figure not measured since the previous message is null (the UI shows n/a), never 0.

Shapes: none (no tensors).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..profiling.formatting import GB, activity_label
from . import comfy_bridge

EVENT = "wanbench.live"
FIGURES = ("activity", "vram_gb", "cpu_pct", "rss_gb")
MIN_INTERVAL_S = 0.5  # at most 2 messages a second

Sender = Callable[[str, dict[str, Any]], None]


class LiveView:
    """Forwards a session's samples to the UI, throttled; `detach()` stops it and says so."""

    def __init__(
        self,
        node_id: str,
        send: Sender,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self._send = send
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_sent: float | None = None
        self._last_t: float | None = None
        self._remove: Callable[[], None] | None = None
        self._pending: dict[str, Any] = {}  # figures measured since the last message
        self.messages_sent = 0

    @classmethod
    def attach(
        cls, session: Any, node_id: str | None, send: Sender | None = None, **options: Any
    ) -> LiveView | None:
        """Start a live view of `session` for the Wan Profiler node `node_id`.

        None when there is nobody to show it to: no node id, or outside ComfyUI with no `send`.
        """
        if node_id is None or (send is None and not comfy_bridge.inside_comfyui()):
            return None
        view = cls(node_id, send or comfy_bridge.send_ui_message, **options)
        view._remove = session.add_listener(view.on_reading)
        return view

    def on_reading(self, reading: Any) -> None:
        """A session listener: send what was measured when `min_interval_s` has passed since the last
        message. Each figure is the newest one measured since that message (a reading may lack some:
        stage-boundary readings take no activity, CPU % needs 0.2 s between readings)."""
        sample = reading.sample
        vram = sample.device_used_bytes if sample.device_used_bytes is not None else sample.cuda_reserved_bytes
        figures = {
            "activity": None if sample.activity_pct is None else round(sample.activity_pct, 1),
            "vram_gb": None if vram is None else round(vram / GB, 3),
            "cpu_pct": None if sample.cpu_pct is None else round(sample.cpu_pct, 1),
            "rss_gb": None if sample.rss_bytes is None else round(sample.rss_bytes / GB, 3),
        }
        self._pending.update({k: v for k, v in figures.items() if v is not None})
        if figures["activity"] is not None:
            self._pending["activity_label"] = activity_label(reading.activity_metric)
        now = self._clock()
        if self._last_sent is not None and now - self._last_sent < self._min_interval_s:
            return
        if not reading.periodic and reading.activity_metric is not None:
            return  # a boundary reading: the next periodic one brings the activity with it
        self._emit(
            {
                "state": "running",
                "t": round(sample.t_s, 3),
                "stage": reading.stage,
                **{key: self._pending.get(key) for key in (*FIGURES, "activity_label")},
            }
        )
        self._pending = {}
        self._last_sent, self._last_t = now, round(sample.t_s, 3)

    def detach(self) -> None:
        """Stop listening and tell the UI the run ended (idempotent)."""
        if self._remove is None:
            return
        self._remove()
        self._remove = None
        self._emit({"state": "done", "t": self._last_t, "stage": None})

    @property
    def attached(self) -> bool:
        return self._remove is not None

    def _emit(self, data: dict[str, Any]) -> None:
        self._send(EVENT, {"node": self.node_id, **data})
        self.messages_sent += 1
