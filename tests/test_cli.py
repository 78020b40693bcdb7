"""The ``normkit`` command line."""

import subprocess
import sys
from pathlib import Path

import pytest

import torch

from normkit import cli
from normkit.cli import main


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "backends" in out and "demo" in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_backends_command_lists_reference(capsys):
    assert cli.main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out


def test_backends_command_states_the_triton_backends_verified_status(capsys, monkeypatch):
    from normkit import cli_backends

    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    if cli_backends.TRITON_GPU_RUN is None:
        assert "triton is EXPERIMENTAL" in out and "recorded GPU run (date, device, commit) is in BENCHMARKS.md" in out
    monkeypatch.setattr(cli_backends, "TRITON_GPU_RUN", ("2027-01-05", "NVIDIA H200", "abc1234"))
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "EXPERIMENTAL" not in out and "NVIDIA H200, 2027-01-05, commit abc1234" in out


def test_demo_is_what_make_demo_runs(capsys):
    """``normkit demo`` is the lab's quick preset, the same command as ``make demo``."""
    from normkit import demo
    from normkit.lab import cli as lab_cli

    assert demo.run is lab_cli.run and demo.add_arguments is lab_cli.add_arguments
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "normkit demo" in makefile or "normkit lab --quick" in makefile


@pytest.mark.parametrize("module", ["normkit", "normkit.cli"])
def test_python_dash_m_runs_the_command(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout, out.stderr


def test_backends_explain_prints_a_calls_path_and_backend(capsys):
    assert cli.main(["backends", "--explain", "8,512", "--grad"]) == 0
    out = capsys.readouterr().out
    from normkit.backends import cpu as compiled

    path = "native" if compiled.extension is not None else "eager"  # the compiled call, else torch's ops
    backend = "cpu" if compiled.extension is not None else "reference"
    assert f"path:    {path}:" in out and f"backend: {backend}: the first available backend" in out
    assert cli.main(["backends", "--explain", "0,512"]) == 0
    assert "path:    composite:" in capsys.readouterr().out  # an empty input: no backend runs
    assert cli.main(["backends", "--explain", "8,x"]) == 2
    assert "--explain expects sizes like 8,512, got '8,x'" in capsys.readouterr().out


def test_version(capsys):
    import normkit

    assert main(["--version"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"normkit {normkit.__version__} (torch {torch.__version__};")


def test_a_missing_extra_is_named_with_its_pip_command(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name == "rich" or name.startswith("rich."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith("normkit.lab")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_rich)
    assert main(["lab", "--help"]) == 2
    assert "pip install 'normkit[lab]'" in capsys.readouterr().err
