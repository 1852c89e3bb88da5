"""The README's commands are the ones CI and users run."""
from conftest import REPO


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (REPO / "README.md").read_text()


def test_library_example_runs_and_trains():
    text = (REPO / "README.md").read_text().split("## gonjax as a library", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "origin.origin_step" in code and "assert loss < 0.8 * first" in code
    exec(compile(code, "README.md (gonjax as a library)", "exec"), {"__name__": "readme_example"})
