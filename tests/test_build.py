"""The install without a C++ compiler: the compiled kernels are skipped with a message and the
package still builds (normkit then runs its numba kernels; tests/test_native_route.py checks
that it works and says so once at run time)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="the compiler is replaced by /bin/false")
def test_a_build_without_a_compiler_skips_the_extension_and_succeeds(tmp_path):
    src = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "*.nb[ic]"))
    env = dict(os.environ, CXX="/bin/false", CC="/bin/false")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", ".", "-w", str(tmp_path / "dist")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "normkit: cannot build the compiled kernels" in out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("normkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "normkit/functional.py" in names
    assert not any(n.endswith(".so") for n in names)
