"""Hatch build hook: ship a mypyc-compiled twin of ``sidechain/sse.py`` in the wheel.

The twin is the top-level extension module ``_sidechain_sse``, compiled from a copy of
``src/sidechain/sse.py`` with the SHA-256 of that file appended as ``SOURCE_SHA256``. It goes into every
wheel this project builds, editable ones included (at the root of site-packages, so nothing is written
into the source tree). ``sidechain.sse`` uses the twin's ``Decoder``, ``Event`` and ``Comment`` only
when the twin was built from the very ``sse.py`` it is importing: after an edit, the pure-Python code
runs until the next install.

Needs a C compiler. ``HATCH_BUILD_NO_HOOKS=true`` builds a pure-Python wheel instead; a compiled build
that fails stops the install, so a broken twin cannot go unnoticed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "_sidechain_sse"
SOURCE = Path("src", "sidechain", "sse.py")
# The sidechain modules mypy needs to type the copy (copied beside it, not compiled): sse.py imports
# errors.py, which imports sse.py when type checking. A new sidechain import in sse.py goes here too.
CONTEXT = [Path("src", "sidechain", "errors.py"), SOURCE]

SETUP = f"""\
from setuptools import setup
from mypyc.build import mypycify

setup(name="{MODULE}", ext_modules=mypycify(["{MODULE}.py"], opt_level="3"))
"""


class MypycTwinHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        self._tmp = tempfile.mkdtemp(prefix="sidechain-mypyc-")  # kept until finalize: the wheel reads it
        try:
            built = self._compile(Path(self.root), Path(self._tmp))
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        key = "force_include_editable" if version == "editable" else "force_include"
        for path in built:
            build_data[key][str(path)] = path.name  # at the root of site-packages
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _compile(self, root: Path, tmp: Path) -> list[Path]:
        (tmp / "sidechain").mkdir()
        (tmp / "sidechain" / "__init__.py").write_text("", encoding="utf-8")
        for path in CONTEXT:
            shutil.copyfile(root / path, tmp / "sidechain" / path.name)
        source = (root / SOURCE).read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        (tmp / f"{MODULE}.py").write_bytes(source + f'\nSOURCE_SHA256 = "{digest}"\n'.encode())
        (tmp / "setup.py").write_text(SETUP, encoding="utf-8")
        (tmp / "mypy.ini").write_text("[mypy]\n", encoding="utf-8")  # no user or project config
        # PYTHONPATH stays: pip's isolated build environment is reached through it.
        env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
        self.app.display_info(f"compiling {SOURCE} with mypyc as {MODULE}")
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        log = proc.stdout.decode("utf-8", "replace")
        if proc.returncode:
            raise RuntimeError(
                f"mypyc could not compile {SOURCE} (HATCH_BUILD_NO_HOOKS=true builds pure Python):\n{log}"
            )
        built = sorted(p for p in tmp.iterdir() if p.suffix in (".so", ".pyd"))
        if not built:
            raise RuntimeError(f"mypyc built nothing for {SOURCE}:\n{log}")
        return built

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
