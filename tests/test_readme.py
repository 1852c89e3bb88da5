"""The README's commands and examples are the ones CI and users run."""
from conftest import REPO
from gonjax.config import Config
from gonjax.train import train_and_evaluate

README = (REPO / "README.md").read_text()


def _python_block(after: str) -> str:
    return README.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in README


def test_library_example_runs_and_trains():
    code = _python_block("## gonjax as a library")
    assert "origin.origin_step" in code and "assert loss < 0.8 * first" in code
    exec(compile(code, "README.md (gonjax as a library)", "exec"), {"__name__": "readme_example"})


def test_quickstart_example_loads_a_trained_run_and_decodes_an_interpolation(shared_data, tfds_dir, tmp_path):
    code = _python_block("## Quickstart")
    assert "gonjax.load_run(\"runs/gon-coil20\")" in code and "run.decode(path)" in code
    run = tmp_path / "gon-coil20"  # the quickstart's run, small: a GON (4, 8) after 2 steps
    train_and_evaluate(Config(dataset="coil20", ngf=4, nz=8, max_steps=2, eval_batches=1, data_dir=str(tfds_dir),
                              manual_dir=str(shared_data)), run)
    code = code.replace('"runs/gon-coil20"', repr(str(run)))
    exec(compile(code, "README.md (Quickstart)", "exec"), {"__name__": "readme_example"})
