"""The kit's submission code (submit.py = the notebook's cells) on a kit built with its wheels stubbed: it
checks the index before it predicts, and its cells show no stray values.

The kit's img2prompt wheel is a stub of the installed version, so the code finds img2prompt already installed
and runs against this environment; no wheel is fetched or installed (the fresh-venv run is in
test_kaggle_kit.py, marked slow)."""
from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from img2prompt.kit import template as kit_template
from img2prompt.index.layout import CLIP_VECTORS, MANIFEST, MINILM
from kit_helpers import build_stub_kit
from conftest import needs_shared


@pytest.fixture(scope="module")
def stub_kit(built_index, tmp_path_factory) -> Path:
    return build_stub_kit(built_index, tmp_path_factory.mktemp("stub-kit") / "kit")


@pytest.fixture
def kit_copy(stub_kit, tmp_path) -> Path:
    """A private copy of the stub kit (real copies, not hard links: a test may damage its files)."""
    import shutil

    return Path(shutil.copytree(stub_kit, tmp_path / "kit", copy_function=shutil.copyfile))


def kit_env(kit: Path, images: Path, out: Path) -> dict[str, str]:
    return {"IMG2PROMPT_KIT": str(kit), "IMG2PROMPT_IMAGES": str(images), "IMG2PROMPT_SAMPLE": "",
            "IMG2PROMPT_OUT": str(out)}


def run_submit_script(kit: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **kit_env(kit, images, out)}
    return subprocess.run([sys.executable, str(kit / kit_template.SCRIPT_NAME)], capture_output=True, text=True,
                          env=env, cwd=kit.parent, timeout=300)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.unlink()  # a new file: never write through a link shared with another index
    path.write_bytes(bytes(data))


def test_kit_json_lists_every_index_file_with_its_checksum(stub_kit):
    from img2prompt.index.layout import file_record

    records = json.loads((stub_kit / "kit.json").read_text())["index"]["files"]
    manifest = json.loads((stub_kit / "index" / MANIFEST).read_text())
    assert set(records) == {MANIFEST, *manifest["files"]}
    for name, record in records.items():
        assert record == file_record(stub_kit / "index" / name), name


@pytest.mark.parametrize("name", [CLIP_VECTORS, MINILM, MANIFEST])
def test_a_damaged_index_stops_the_script_before_it_predicts(kit_copy, sample_images, tmp_path, name):
    target = kit_copy / "index" / name
    flip_byte(target, target.stat().st_size // 2)  # same size: only the sha256 tells
    submission = tmp_path / "submission.csv"
    done = run_submit_script(kit_copy, sample_images, submission)
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "damaged" in message and str(target) in message and "sha256" in message
    assert "index verified" not in done.stdout and not submission.exists()


def test_a_truncated_index_file_is_told_by_its_size(kit_copy, sample_images, tmp_path):
    target = kit_copy / "index" / CLIP_VECTORS
    target.write_bytes(target.read_bytes()[:-2])
    done = run_submit_script(kit_copy, sample_images, tmp_path / "submission.csv")
    assert done.returncode == 1 and "bytes, kit.json says" in done.stderr and str(target) in done.stderr
    assert not (tmp_path / "submission.csv").exists()


def run_submit_in_process(kit: Path, images: Path, out: Path, monkeypatch) -> str:
    """Run the kit's submit.py in this process (img2prompt already imported: fast); returns what it printed."""
    for key, value in kit_env(kit, images, out).items():
        monkeypatch.setenv(key, value)
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile((kit / kit_template.SCRIPT_NAME).read_text("utf-8"), "submit.py", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def test_an_intact_kit_is_verified_and_submits(stub_kit, sample_images, tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    printed = run_submit_in_process(stub_kit, sample_images, submission, monkeypatch)
    assert "index verified: " in printed and "is already installed" in printed
    rows = pd.read_csv(submission)
    assert len(rows) == 4 * 384
    values = rows["val"].to_numpy(dtype=np.float64).reshape(4, 384)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)


def test_the_in_process_run_also_refuses_a_damaged_index(kit_copy, sample_images, tmp_path, monkeypatch):
    flip_byte(kit_copy / "index" / CLIP_VECTORS, 0)
    with pytest.raises(SystemExit, match="index is damaged, nothing was predicted"):
        run_submit_in_process(kit_copy, sample_images, tmp_path / "submission.csv", monkeypatch)
    assert not (tmp_path / "submission.csv").exists()


def shown_expressions(code: str) -> list[str]:
    """A cell's last statement when Jupyter would display its value: a bare expression other than print()."""
    body = ast.parse(code).body
    last = body[-1] if body else None
    if isinstance(last, ast.Expr) and not (isinstance(last.value, ast.Call)
                                           and getattr(last.value.func, "id", None) == "print"):
        return [ast.unparse(last)[:60]]
    return []


def test_no_cell_displays_a_stray_value():
    cells = [text for kind, text in kit_template.split_cells() if kind == "code"]
    assert len(cells) >= 4
    assert [shown for code in cells for shown in shown_expressions(code)] == []
    assert shown_expressions("import subprocess\nsubprocess.check_call(['true'])") != []  # what the pip cell did


def test_the_submission_path_uses_the_plain_tqdm_bar():
    """img2prompt's own bars (the image encoding the kit runs) are tqdm.std's plain text bar, never a widget."""
    import tqdm.std

    from img2prompt import progress

    assert progress.tqdm is tqdm.std.tqdm
    bar = progress.progress_bar(total=1, enabled=False)
    assert type(bar) is tqdm.std.tqdm
    bar.close()


def test_the_predict_cell_imports_tqdm_auto_without_the_iprogress_warning(monkeypatch):
    """open_clip's dependencies import tqdm.auto; in a Jupyter kernel without ipywidgets that import warns
    "IProgress not found". Simulated here (a kernel's get_ipython, no IProgress): the predict cell's code
    before `import img2prompt` imports it with no warning, and falls back to the plain bar."""
    import types
    import warnings

    import tqdm.notebook
    import tqdm.std

    class ZMQInteractiveShell:  # what get_ipython() returns in a Jupyter kernel
        pass

    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)

    def fresh_import(code: str) -> tuple[dict, list[str]]:
        for name in ("tqdm.auto", "tqdm.autonotebook"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        namespace: dict = {}
        with warnings.catch_warnings(record=True) as caught:  # (as errors they would be caught by tqdm)
            warnings.simplefilter("always")
            exec(code, namespace)
        return namespace, [str(warning.message) for warning in caught]

    _, shown = fresh_import("import tqdm.auto")
    assert any("IProgress not found" in message for message in shown)  # the simulation is real: it warns
    cell = next(text for kind, text in kit_template.split_cells() if kind == "code" and "import img2prompt" in text)
    namespace, shown = fresh_import(cell.split("\nimport img2prompt\n")[0])
    assert shown == []
    bar_class = namespace["tqdm"].auto.tqdm  # the plain text bar (tqdm.asyncio's subclass of it), no widget
    assert issubclass(bar_class, tqdm.std.tqdm) and not issubclass(bar_class, tqdm.notebook.tqdm_notebook)


@pytest.mark.slow
@needs_shared("kaggle-sample/images")
def test_the_notebook_runs_in_a_kernel_without_stray_output(stub_kit, tmp_path):
    """The kit's notebook executed in a Jupyter kernel of this environment (no ipywidgets here): each cell
    prints plain lines, none shows a value or the IProgress warning, and the submission is written."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        pytest.skip("ipywidgets is installed: the IProgress warning cannot occur here")
    kernels = tmp_path / "kernels"
    (kernels / "here").mkdir(parents=True)
    (kernels / "here" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "here", "language": "python"}))
    from conftest import KAGGLE_SAMPLE

    images = KAGGLE_SAMPLE / "images"
    submission = tmp_path / "submission.csv"
    notebook = nbformat.read(stub_kit / kit_template.NOTEBOOK_NAME, as_version=4)
    manager = AsyncKernelManager(kernel_name="here", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = nbclient.NotebookClient(notebook, km=manager, kernel_name="here", timeout=300, startup_timeout=120)
    client.execute(env={**os.environ, **kit_env(stub_kit, images, submission)}, cwd=str(tmp_path))
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert [output.output_type for output in outputs if output.output_type != "stream"] == []
    shown = "".join(output.get("text", "") for output in outputs)
    assert "IProgress" not in shown and "Warning" not in shown
    assert "index verified" in shown and "is already installed" in shown and f"wrote {submission}" in shown
    assert submission.is_file()


def test_a_failed_install_is_one_line_naming_pips_error(kit_copy, sample_images, tmp_path, monkeypatch):
    """pip's message is captured (a notebook cell would not show a child's stderr) and its ERROR line ends
    the run; nothing is predicted. The kit asks for a version its wheels/ do not hold, so pip cannot succeed."""
    info = json.loads((kit_copy / "kit.json").read_text())
    info["img2prompt_version"] = "0.0.1"
    (kit_copy / "kit.json").write_text(json.dumps(info))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(SystemExit, match=r"pip could not install img2prompt 0\.0\.1 from .*wheels: ERROR: ") as caught:
        run_submit_in_process(kit_copy, sample_images, tmp_path / "submission.csv", monkeypatch)
    assert "\n" not in str(caught.value) and "img2prompt==0.0.1" in str(caught.value)
    assert not (tmp_path / "submission.csv").exists()
