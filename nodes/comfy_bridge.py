"""Lazy access to ComfyUI: model folders, progress bar, interrupts, save paths, UI messages.

Nothing here imports ComfyUI at module import time. Inside a ComfyUI server every helper uses
ComfyUI's own facilities; outside one (tests, the in-process runner of the CLI) model names are
plain file paths, progress goes to the log, interrupts never happen and outputs go to the folder
of the active `Bridge` (installed with `context.use_bridge`, never a module global).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .context import FOLDER_DIT, FOLDER_LORAS, FOLDER_TEXT_ENCODERS, FOLDER_VAE, Bridge, current_bridge

log = logging.getLogger(__name__)

# The model folder names and `Bridge` live in `context` (the standalone environment); they are
# named here too because the nodes reach all of ComfyUI's side through this module.
__all__ = [
    "FOLDER_DIT",
    "FOLDER_LORAS",
    "FOLDER_TEXT_ENCODERS",
    "FOLDER_VAE",
    "Bridge",
    "check_interrupt",
    "current_prompt_id",
    "inside_comfyui",
    "list_models",
    "make_progress",
    "model_folder_description",
    "model_management",
    "output_directory",
    "resolve_model",
    "save_path",
    "send_ui_message",
]


def _comfy_module(name: str) -> ModuleType | None:
    """The ComfyUI module `name` when running inside ComfyUI, else None.

    ComfyUI's modules (`folder_paths`, `comfy.utils`, `comfy.model_management`, `server`) are
    imported by the server before any custom node runs, so they are looked up in `sys.modules`:
    this never imports anything and never picks up an unrelated module of the same name.
    """
    return sys.modules.get(name)


def inside_comfyui() -> bool:
    """True when ComfyUI's `folder_paths` module is loaded (i.e. we run inside a server)."""
    return _comfy_module("folder_paths") is not None


GGUF_SUFFIX = ".gguf"


def list_models(folder: str) -> list[str]:
    """File names ComfyUI lists for `folder`, plus its `.gguf` files (ComfyUI's own list leaves that
    extension out); standalone: the files in the bridge's folder."""
    fp = _comfy_module("folder_paths")
    if fp is not None:
        return sorted({*fp.get_filename_list(folder), *_gguf_files(fp.get_folder_paths(folder))})
    directory = current_bridge().model_dirs.get(folder)
    if directory is None or not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_file() or p.is_dir())


def model_folder_description(folder: str) -> str:
    """Where model files of `folder` are looked up, for messages: ComfyUI's folder name inside a
    server, the bridge's directory standalone."""
    if _comfy_module("folder_paths") is not None:
        return f"ComfyUI's models/{folder}/ folder"
    directory = current_bridge().model_dirs.get(folder)
    return str(directory) if directory is not None else f"no {folder!r} folder (none configured)"


def _gguf_files(folders: list[str]) -> list[str]:
    """`.gguf` files under ComfyUI's paths of a model folder, as names relative to their folder."""
    names = []
    for folder in folders:
        root = Path(folder)
        if root.is_dir():
            names += [p.relative_to(root).as_posix() for p in root.rglob("*" + GGUF_SUFFIX) if p.is_file()]
    return names


def resolve_model(folder: str, name: str) -> str:
    """Full path of model `name` in `folder`.

    Inside ComfyUI: `folder_paths.get_full_path`. Standalone: an absolute/existing path is taken
    as is, otherwise it is looked up in the bridge's folder.
    """
    fp = _comfy_module("folder_paths")
    if fp is not None:
        path = fp.get_full_path(folder, name)
        if path is None:
            raise FileNotFoundError(
                f"model {name!r} is not in ComfyUI's {folder!r} folder; "
                f"put the file under models/{folder}/ and refresh"
            )
        return str(path)
    candidate = Path(name)
    if candidate.exists():
        return str(candidate)
    directory = current_bridge().model_dirs.get(folder)
    if directory is not None and (directory / name).exists():
        return str(directory / name)
    where = str(directory) if directory is not None else "no models folder configured"
    raise FileNotFoundError(
        f"model {name!r} not found as a path nor in the {folder!r} folder ({where}); "
        f"pass an existing file or run `wanbench make-tiny-models DIR`"
    )


def output_directory() -> Path:
    """ComfyUI's output folder, or the bridge's output folder standalone."""
    fp = _comfy_module("folder_paths")
    if fp is not None:
        return Path(fp.get_output_directory())
    return current_bridge().output_dir


def save_path(prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, counter, subfolder) for a new output file with the given prefix.

    Inside ComfyUI this is `folder_paths.get_save_image_path`, so counters and subfolders behave
    like the core save nodes; standalone the same numbering is applied to the bridge's folder.
    """
    fp = _comfy_module("folder_paths")
    if fp is not None:
        folder, stem, counter, subfolder, _ = fp.get_save_image_path(
            prefix, fp.get_output_directory(), width, height
        )
        return Path(folder), stem, int(counter), subfolder
    root = output_directory()
    sub, _, stem = prefix.replace("\\", "/").rpartition("/")
    folder = (root / sub).resolve() if sub else root.resolve()
    if root.resolve() not in (folder, *folder.parents):
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder {root}")
    folder.mkdir(parents=True, exist_ok=True)
    used = [
        int(p.stem.rsplit("_", 2)[-2])
        for p in folder.glob(f"{stem}_*_.*")
        if p.stem.rsplit("_", 2)[-2].isdigit()
    ]
    return folder, stem, max(used, default=0) + 1, sub


def make_progress(total: int, label: str) -> Callable[[int], None]:
    """A `step(done)` callback: ComfyUI's ProgressBar inside a server, the log outside."""
    utils = _comfy_module("comfy.utils")
    if utils is not None:
        bar = utils.ProgressBar(total)

        def advance(done: int) -> None:
            bar.update_absolute(done, total)

        return advance

    def log_progress(done: int) -> None:
        log.info("%s: %d/%d", label, done, total)

    return log_progress


def model_management() -> ModuleType | None:
    """ComfyUI's `comfy.model_management` inside a server (its memory manager), else None."""
    return _comfy_module("comfy.model_management")


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op standalone)."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def current_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing (None standalone)."""
    server = _comfy_module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None) if server else None
    return getattr(instance, "last_prompt_id", None)


def send_ui_message(event: str, data: dict[str, Any]) -> None:
    """Send a custom websocket message through PromptServer (no-op standalone)."""
    server = _comfy_module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None) if server else None
    if instance is not None:
        instance.send_sync(event, data)
