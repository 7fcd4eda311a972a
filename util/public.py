"""The module name under which the pack's own error types are shown: `wanbench.errors`.

ComfyUI names an exception by `type.__module__ + "." + type.__qualname__`. Inside a ComfyUI server
the pack is imported by path, so its modules are named after the server's folder
(`/home/me/ComfyUI/custom_nodes/ComfyUI-WanBench.wan_core.errors`). Every error class of the pack
therefore sets `__module__ = PUBLIC_MODULE`, which gives the same short, stable name everywhere
(`wanbench.errors.CheckpointError`); the module `wanbench.errors` re-exports all of them, so the
name also resolves when the pack is installed as the `wanbench` package.

Standard library only (no imports at all): every layer may import it.
"""

from __future__ import annotations

PUBLIC_MODULE = "wanbench.errors"
