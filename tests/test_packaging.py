"""mlaserve's top-level `kernels` package must be the only `kernels` in the environment."""

import importlib.metadata
import subprocess
import sys


def test_no_other_installed_distribution_owns_the_kernels_import_name():
    # transformers 5.25 made Hugging Face's `kernels` a hard dependency; a fresh install that
    # resolves it breaks every transformers model import (CI run of stop 37), so pin and check.
    owners = set(importlib.metadata.packages_distributions().get("kernels", []))
    assert owners <= {"mlaserve"}, f"other distributions install a `kernels` module: {owners - {'mlaserve'}}"


def test_a_shadowing_kernels_package_is_named_at_import(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = object\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import engine"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "pip uninstall kernels" in proc.stderr and str(fake) in proc.stderr, proc.stderr
