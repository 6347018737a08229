"""What the layers promise: importing the library or the application pulls in neither
scikit-learn nor matplotlib, and the installed package holds no pytest-benchmark suite."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["fastddpm", "fastddpm.app", "fastddpm.cli", "fastddpm.testing"])
def test_importing_loads_neither_scikit_learn_nor_matplotlib(module):
    code = (f"import sys, {module}; "
            "print(sorted(name for name in ('sklearn', 'matplotlib') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_installed_benchmarks_hold_no_test_suite(tmp_path):
    """setup.py's build copies benchmarks/*.py as fastddpm.benchmarks, not benchmarks/suites/."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.py")}
    assert {"fastddpm/app/run.py", "fastddpm/benchmarks/suite.py", "fastddpm/benchmarks/harness.py",
            "fastddpm/testing.py"} <= installed
    assert not [path for path in installed if pathlib.PurePath(path).name.startswith("test_")]
    assert sorted(path.name for path in (ROOT / "benchmarks" / "suites").glob("test_bench_*.py"))
