"""The install: without a C++ compiler the compiled kernels are skipped with one message and the
package still builds (normkit then runs torch's own ops, the reference composite;
tests/test_native_route.py checks that it works and says so once at run time); a build made for
another torch is refused by the loader with a message that says how to rebuild."""

from __future__ import annotations

import os
import re
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
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.so", "_C_build_info.py", "__pycache__", "*.egg-info", "*.nb[ic]"))
    env = dict(os.environ, CXX="/bin/false", CC="/bin/false")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", ".", "-w", str(tmp_path / "dist")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert log.count("normkit: not building the compiled CPU kernels: no usable C++ compiler") == 1, log[-3000:]
    (wheel,) = (tmp_path / "dist").glob("normkit-*.whl")
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    assert "normkit/functional.py" in names
    assert not any(n.endswith(".so") or n.endswith("_C_build_info.py") for n in names)
    metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    hard = {line.split(":", 1)[1].split(";")[0].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert {re.split(r"[<>=!~ ]", d)[0] for d in hard} == {"torch", "numpy"}, hard  # the extras stay optional


def test_the_build_records_the_torch_it_was_built_against():
    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip(f"normkit._C not loaded: {cpu.unavailable_reason()}")
    import torch

    from normkit import _C_build_info as info

    assert info.TORCH_VERSION == cpu.extension.BUILT_TORCH == torch.__version__
    assert info.CXX11_ABI == cpu.extension.BUILT_CXX11_ABI == int(torch._C._GLIBCXX_USE_CXX11_ABI)


@pytest.mark.parametrize(
    "built, abi, running, expect",
    [
        ("2.13.0+cpu", 1, "2.13.0+cpu", None),
        ("2.12.1+cpu", 1, "2.13.0+cpu", "built against torch 2.12.1+cpu, but torch 2.13.0+cpu is running"),
        ("2.13.0+cpu", 0, "2.13.0+cpu", "_GLIBCXX_USE_CXX11_ABI=0"),
        (None, None, "2.13.0+cpu", "no record of the torch"),
    ],
)
def test_build_mismatch(built, abi, running, expect):
    from normkit.backends.cpu import build_mismatch

    got = build_mismatch(built, abi, running, 1)
    assert (got is None) if expect is None else (expect in got)


def test_an_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """A copy of the package whose build record names another torch: the loader refuses the
    extension before importing it, says how to rebuild, and normkit still computes."""
    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip(f"normkit._C not loaded: {cpu.unavailable_reason()}")
    pkg = tmp_path / "normkit"
    shutil.copytree(ROOT / "src" / "normkit", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_C_build_info.py").write_text("TORCH_VERSION = '2.0.0+cpu'\nCXX11_ABI = 1\n")
    code = (
        "import warnings, torch, normkit\n"
        "from normkit.backends import cpu\n"
        "assert cpu.extension is None\n"
        "print(cpu.unavailable_reason())\n"
        "x = torch.randn(3, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = normkit.layer_norm(x, (8,))\n"
        "torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))\n"
        "print(len([m for m in w if 'compiled CPU kernels unavailable' in str(m.message)]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    reason, warned = out.stdout.strip().splitlines()[-2:]
    assert "built against torch 2.0.0+cpu" in reason and "pip install --force-reinstall" in reason
    assert warned == "1"


def test_the_kernels_run_on_torchs_intra_op_threads():
    """torch's OpenMP intra-op backend is a header template compiled into the extension: built
    without -fopenmp, every at::parallel_for in normkit._C would run on one thread."""
    import torch

    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip(f"normkit._C not loaded: {cpu.unavailable_reason()}")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.extension.parallel_threads() == 2
        torch.set_num_threads(1)
        assert cpu.extension.parallel_threads() == 1
    finally:
        torch.set_num_threads(old)
