"""The README's two commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command_as_written():
    main_job, tests = readme_commands()[:2]
    assert "pytest" in tests and tests in (ROOT / ".ci" / "run").read_text().splitlines()
    assert main_job.endswith("fastddpm train")
    for command in (main_job, tests):
        assert "pip install torch==2.13.0" in command or "pip install -q torch==2.13.0" in command
