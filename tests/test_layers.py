"""The layer contract (.importlinter), checked by import-linter on the package as installed
(kernels/ as fastddpm.kernels), and the limits a reader relies on: no file over 400 lines,
nothing that points outside the repository."""
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LINT = ("import sys\nfrom importlinter.cli import lint_imports_command\n"
        "sys.argv = ['lint-imports', sys.argv[1]]\nsys.exit(lint_imports_command())")


def installed_layout(folder):
    """fastddpm/ with kernels/ as fastddpm/kernels/, as setup.py's package_dir installs them."""
    package = folder / "fastddpm"
    shutil.copytree(REPO / "fastddpm", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", package / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return package


def lint(folder):
    pytest.importorskip("importlinter")
    return subprocess.run([sys.executable, "-c", LINT, str(REPO / ".importlinter")], cwd=folder,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_the_layer_contract_holds(tmp_path):
    installed_layout(tmp_path)
    done = lint(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout


@pytest.mark.parametrize("module, upward", [
    ("kernels/_common.py", "import fastddpm.functional"),  # a kernel importing the API above it
    ("reference/diffusion.py", "import fastddpm.sampling"),  # a lower layer importing a higher one
    ("respace.py", "import fastddpm.resample"),  # siblings declared independent
])
def test_an_upward_import_breaks_it(tmp_path, module, upward):
    package = installed_layout(tmp_path)
    path = package / module
    path.write_text(path.read_text() + f"\n{upward}  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0 and "BROKEN" in done.stdout.upper(), done.stdout[-2000:]


def test_no_file_over_400_lines():
    long = {str(path.relative_to(REPO)): n for folder in ("fastddpm", "kernels")
            for path in (REPO / folder).rglob("*.py") if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_nothing_points_at_the_shared_folder():
    text_files = [p for p in REPO.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".toml", ".cfg", ".txt")
                  and ".venv" not in p.parts and ".git" not in p.parts]
    shared = "../" + "shared"  # the folder beside the repository, which users do not have
    pointing = [str(p.relative_to(REPO)) for p in text_files if shared in p.read_text(errors="ignore")]
    assert not pointing, pointing
