"""docs/tour.ipynb, executed through a Jupyter kernel (nbclient) in its short pass, so the tour never rots."""
import nbformat
from nbclient import NotebookClient

from conftest import REPO

TOUR = REPO / "docs" / "tour.ipynb"


def _pictures(notebook) -> list[str]:
    """The PNG outputs of the notebook's code cells, in order."""
    return [output["data"]["image/png"] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def test_the_tour_runs_end_to_end_and_is_committed_with_its_pictures(shared_data, tfds_dir, tmp_path, monkeypatch):
    """Every cell runs without an error against the library as it is now (the short pass: a few steps of the GON
    and the Implicit GON on COIL-20, offline from the official files), drawing each of its five figures (curves,
    reconstructions, interpolation, 4x rendering, samples) and writing both run folders; the committed notebook
    carries the outputs of a full pass."""
    committed = nbformat.read(TOUR, as_version=4)
    assert len(_pictures(committed)) == 5
    monkeypatch.setenv("GONJAX_TOUR_QUICK", "1")
    monkeypatch.setenv("GONJAX_MANUAL_DIR", str(shared_data))
    monkeypatch.setenv("GONJAX_DATA_DIR", str(tfds_dir))
    notebook = nbformat.read(TOUR, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a cell's error
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    assert len(_pictures(notebook)) == 5
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "step 18: squared error per image" in text and "step 2: per-pixel MSE" in text
    assert "read_only=True" not in text and "read only" not in text  # orbax's notices on loading are held back
    warnings = [line for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                if output.get("name") == "stderr" for line in output.get("text", "").splitlines() if "WARNING" in line]
    assert not warnings  # nor TFDS's while it prepares COIL-20 in a fresh data dir
    for run in ("gon", "implicit_gon"):
        assert (tmp_path / "runs" / "tour" / run / "metrics.jsonl").is_file()
