"""The wheel installs kernels/ and conf/ inside the package, and never a top-level `kernels`."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("lstmlab-*.whl")
    return built


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lstmlab"}, f"the wheel installs {sorted(top_level)}, expected only lstmlab"
    assert "lstmlab/kernels/layer.py" in names
    assert "lstmlab/kernels/triton_gates.py" in names
    yaml_in_repo = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml"))
    yaml_in_wheel = sorted(n.removeprefix("lstmlab/") for n in names if n.endswith(".yaml"))
    assert yaml_in_wheel == yaml_in_repo


def test_installed_wheel_imports_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    assert not (target / "kernels").exists()
    code = (
        "import lstmlab, lstmlab.kernels, torch;"
        "print(lstmlab.kernels.__file__);"
        "print('x'.join(map(str, lstmlab.LSTM(2, 3)(torch.randn(4, 1, 2))[0].shape)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    kernels_file, shape = result.stdout.split()
    assert Path(kernels_file).is_relative_to(target), kernels_file
    assert shape == "4x1x3"
