"""notebooks/quickstart.ipynb runs top to bottom as a user runs it (in notebooks/, offline) and shows what it says.

The notebook is executed by nbclient in a kernel of the interpreter running the tests; only its output folder is
moved to a temporary one, by a cell put after the cell tagged `parameters` (papermill's convention).
"""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
CELL_TIMEOUT = 900  # seconds; the training cells take about a minute each on 2 free CPU cores


def stored_notebook() -> nbformat.NotebookNode:
    notebook = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(notebook)
    return notebook


def test_quickstart_is_stored_without_outputs():
    """Outputs (images, progress bars) would make every re-run a large diff; the test suite runs the notebook."""
    for cell in stored_notebook().cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def stream_text(cell, name: str) -> str:
    return "".join(output.text for output in cell.outputs if output.output_type == "stream" and output.name == name)


def widget_text(cell) -> str:
    return "".join(
        output.data.get("text/plain", "") for output in cell.outputs if output.output_type == "display_data"
    )


def images(cell) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(output.data["image/png"])))
        for output in cell.outputs
        if output.output_type == "display_data" and "image/png" in output.data
    ]


def calls_display(cell) -> bool:
    """Whether the cell shows something at its top level (a line that starts with show( or display()."""
    return any(line.startswith(("show(", "display(")) for line in cell.source.splitlines())


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The quickstart notebook run top to bottom (once for this module's tests), with its output folder."""
    output_dir = tmp_path_factory.mktemp("quickstart")
    notebook = stored_notebook()
    parameters = [index for index, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1, "the notebook needs one cell tagged 'parameters' (its output folder)"
    override = f"import sys\nprint(sys.executable)\noutput_dir = Path({str(output_dir)!r})"
    notebook.cells.insert(parameters[0] + 1, nbformat.v4.new_code_cell(override))
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits it: nothing may be downloaded
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    assert stream_text(notebook.cells[parameters[0] + 1], "stdout").strip() == sys.executable
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    return code, output_dir, notebook.cells[parameters[0]].source


def cell_printing(code, pattern: str):
    """The first match of `pattern` in the cells' printed output."""
    for cell in code:
        if match := re.search(pattern, stream_text(cell, "stdout")):
            return match
    raise AssertionError(f"no cell printed {pattern!r}")


def test_quickstart_trains_saves_and_reloads(executed):
    code, output_dir, parameters = executed
    trainable, total = cell_printing(code, r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)").groups()
    assert 0 < int(trainable.replace(",", "")) < int(total.replace(",", ""))
    steps = int(re.search(r"^train_steps = (\d+)", parameters, re.MULTILINE).group(1))
    # tqdm.auto: a text bar on stderr, or a widget whose text/plain form is the same bar where ipywidgets is installed
    progress = "".join(stream_text(cell, "stderr") + widget_text(cell) for cell in code)
    assert progress.count(f"{steps}/{steps} [") >= 2, "both adapters' training progress bars should reach the end"
    assert float(cell_printing(code, r"frozen by the progressive step (\d+)%").group(1)) > 0
    assert float(cell_printing(code, r"trained and the reloaded UNet's outputs: (\S+)").group(1)) == 0
    for name in ("sks-circle", "zwx-square"):
        assert (output_dir / name / "adapter_model.safetensors").is_file()
        assert '"peft_type": "SARA"' in (output_dir / name / "adapter_config.json").read_text()
        # PEFT's card: a pathlib object in it (a Path given to from_pretrained) makes the next save into it fail
        assert "!!python" not in (output_dir / name / "README.md").read_text()


def test_quickstart_combines_fuses_and_exports(executed):
    code, output_dir, _ = executed
    assert "{'unet': ['circle', 'frame']}" in cell_printing(code, r"adapters: .*").group(0)
    assert int(cell_printing(code, r"pixel values differ by at most (\d+) of 255").group(1)) <= 2
    summary = cell_printing(code, r"LoRA \(diffusers\) written to .*\n.*\n\s*energy retained: ([\d.]+)%")
    assert 0 < float(summary.group(1)) <= 100
    assert (output_dir / "sks-circle-lora" / "pytorch_lora_weights.safetensors").is_file()


def test_quickstart_shows_its_images(executed):
    code, _, _ = executed
    showing = [cell for cell in code if calls_display(cell)]
    assert len(showing) >= 6
    for cell in showing:
        shown = images(cell)
        assert shown, f"no image shown by the cell {cell.source[:80]!r}"
        for image in shown:
            assert image.width >= 128 and image.height >= 128  # enlarged grids of 32×32 pictures
            assert image.getextrema() != ((255, 255),) * 3, "a blank image"
