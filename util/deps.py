"""Third-party packages the pack needs at run time, imported with an error that says how to install them.

A missing package otherwise surfaces as a bare `No module named 'ftfy'` from deep inside a model
load. `require(module)` imports it or raises `MissingDependencyError` naming the package, what the
pack needs it for, the Python that lacks it and the install line (the pack's `requirements.txt`
lists every runtime dependency for ComfyUI-Manager and manual installs).

Standard library only: every layer may import this module.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .public import PUBLIC_MODULE

# import name -> (pip requirement, what the pack uses it for)
RUNTIME_PACKAGES: dict[str, tuple[str, str]] = {
    "ftfy": ("ftfy>=6.1", "prompt cleaning before tokenizing, as the official Wan code does"),
    "sentencepiece": ("sentencepiece>=0.2", "the UMT5 tokenizer"),
    "av": ("av>=12", "writing mp4 videos (PyAV)"),
    "einops": ("einops>=0.7", "tensor rearrangements in the model code"),
    "safetensors": ("safetensors>=0.4", "reading and writing .safetensors model files"),
}


class MissingDependencyError(ImportError):
    """A package the pack needs is not installed in the Python that runs it."""

    __module__ = PUBLIC_MODULE


def install_hint(module: str) -> str:
    """The install line for a runtime package, for the Python running now."""
    requirement = RUNTIME_PACKAGES[module][0]
    return (
        f"{sys.executable} -m pip install '{requirement}' (or every dependency of the pack: "
        f"{sys.executable} -m pip install -r <the pack's folder>/requirements.txt)"
    )


def require(module: str) -> ModuleType:
    """Import a runtime package, or raise `MissingDependencyError` with the install line."""
    if module not in RUNTIME_PACKAGES:
        raise KeyError(f"{module!r} is not one of the pack's runtime packages {sorted(RUNTIME_PACKAGES)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        requirement, purpose = RUNTIME_PACKAGES[module]
        raise MissingDependencyError(
            f"the Python package {requirement.split('>')[0]!r} ({purpose}) is not installed in "
            f"{sys.executable}; install it with: {install_hint(module)}"
        ) from err
