"""The README's commands are the ones CI and users run."""
from conftest import REPO


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (REPO / "README.md").read_text()
