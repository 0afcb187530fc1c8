"""Builds ``sluicegate.core.engine._native`` (native/read_blobs.c and the vendored BLAKE3) with the C
compiler, when there is one: the engine reads in Python without it, correct but slower beside a busy
training loop.

``SLUICEGATE_NATIVE``: ``auto`` (the default: build if a compiler and Python's headers are here, else
warn and go on), ``1`` (fail the install if the build fails), ``0`` (do not build).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE_DIR = "sluicegate/core/engine"
NAME = "_native"


def sources(native: Path) -> tuple[list[str], list[Path]]:
    """The compiler's defines and the source files for this machine: BLAKE3's x86-64 assembly (each
    picked at run time by what the CPU has) on x86-64 Unix, its portable C elsewhere."""
    blake3 = native / "blake3"
    files = [
        native / "read_blobs.c",
        *(blake3 / f for f in ("blake3.c", "blake3_dispatch.c", "blake3_portable.c")),
    ]
    if platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix":
        return [], [*files, *sorted(blake3.glob("*_x86-64_unix.S"))]
    flags = ["-DBLAKE3_USE_NEON=0", *(f"-DBLAKE3_NO_{s}" for s in ("SSE2", "SSE41", "AVX2", "AVX512"))]
    return flags, files


def compile_native(root: Path, out_dir: Path) -> Path:
    """The extension module, compiled into ``out_dir``; raises ``RuntimeError`` saying why it could not be."""
    flags, files = sources(root / "native")
    target = out_dir / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise RuntimeError(f"Python's C headers are not installed ({include}/Python.h is missing)")
    command = [
        *shlex.split(os.environ.get("CC", "cc")),
        "-O3",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        f"-I{include}",
        f"-I{root / 'native' / 'blake3'}",
        *flags,
        *map(str, files),
        "-o",
        str(target),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeError(f"no C compiler ({command[0]}): {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return target


class NativeBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        mode = os.environ.get("SLUICEGATE_NATIVE", "auto")
        if self.target_name != "wheel" or mode == "0":
            return
        root = Path(self.root)
        # An editable install imports from the source tree, so the module is built there; a wheel takes it
        # from a scratch directory that finalize removes.
        self._scratch = None if version == "editable" else Path(tempfile.mkdtemp(prefix="sluicegate-native-"))
        out_dir = root / "sdk" / PACKAGE_DIR if self._scratch is None else self._scratch
        try:
            built = compile_native(root, out_dir)
        except RuntimeError as exc:
            if mode == "1":
                raise
            self.app.display_warning(f"sluicegate: the native reader was not built, reading in Python: {exc}")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(built)] = f"{PACKAGE_DIR}/{built.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if getattr(self, "_scratch", None) is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
