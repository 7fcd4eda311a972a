"""The standalone environment (model folders, output folder) the nodes use outside ComfyUI.

`Bridge` says where standalone runs look for models and write outputs; the active one is held in a
context variable so that concurrent in-process runs (tests, the CLI) never share state through
module globals. Inside ComfyUI it is not consulted. `comfy_bridge` reads it here; this module
imports nothing from the pack.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# ComfyUI model folder names used by the pack.
FOLDER_DIT = "diffusion_models"
FOLDER_TEXT_ENCODERS = "text_encoders"
FOLDER_VAE = "vae"
FOLDER_LORAS = "loras"
MODEL_FOLDERS = (FOLDER_DIT, FOLDER_TEXT_ENCODERS, FOLDER_VAE, FOLDER_LORAS)


@dataclass
class Bridge:
    """Where standalone runs look for models and write outputs.

    `model_dirs` maps a ComfyUI folder name ("diffusion_models", "text_encoders", "vae", "loras")
    to a directory; `output_dir` receives saved files. Inside ComfyUI both are ignored.
    """

    output_dir: Path = field(default_factory=lambda: Path.cwd() / "wanbench_out")
    model_dirs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def for_models_root(
        cls, models_root: str | os.PathLike[str], output_dir: str | os.PathLike[str]
    ) -> Bridge:
        """A bridge whose model folders are `models_root/<folder>` (the layout of `make-tiny-models`)."""
        root = Path(models_root)
        return cls(
            output_dir=Path(output_dir),
            model_dirs={name: root / name for name in MODEL_FOLDERS},
        )


_BRIDGE: contextvars.ContextVar[Bridge | None] = contextvars.ContextVar("wanbench_bridge", default=None)


def current_bridge() -> Bridge:
    """The bridge installed by `use_bridge`, or a default one (cwd/wanbench_out, no model folders)."""
    bridge = _BRIDGE.get()
    return bridge if bridge is not None else Bridge()


@contextlib.contextmanager
def use_bridge(bridge: Bridge) -> Iterator[Bridge]:
    """Run node code inside the block with `bridge`'s model and output folders."""
    token = _BRIDGE.set(bridge)
    try:
        yield bridge
    finally:
        _BRIDGE.reset(token)
