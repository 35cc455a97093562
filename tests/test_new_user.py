"""What a new user meets following README verbatim (issue 30 item 14): the Python API snippet runs on the
shipped data, and a taken port, a malformed labels file and an offline hub model name are one line each."""
from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys

import pytest

from conftest import DATA, REPO, read_data_prompts
from img2prompt import cli
from img2prompt.errors import UserError


def readme_python_snippet() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # a subprocess: builds a 100-prompt index with the stand-in CLIP, then runs the snippet
def test_the_readme_python_api_snippet_runs_as_written_on_the_shipped_data(tmp_path):
    (tmp_path / "data").mkdir()  # the shipped data, with a shorter corpus (the snippet's build is the cost)
    (tmp_path / "data" / "prompts.txt").write_text("\n".join(read_data_prompts(100)) + "\n", encoding="utf-8")
    (tmp_path / "data" / "images").symlink_to(DATA / "images")
    main_job = subprocess.run([sys.executable, "-m", "img2prompt.stand_in", "out/tiny-clip"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)  # as README's main job starts
    assert main_job.returncode == 0, main_job.stderr
    done = subprocess.run([sys.executable, "-c", readme_python_snippet()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "out" / "submission.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 6 * 384 and (tmp_path / "out" / "preds.npy").is_file()


def test_serve_on_a_taken_port_names_the_port_and_the_flag(built_index, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(built_index), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"port {port}" in err and "--port" in err, err


def test_eval_labels_with_a_malformed_row_names_the_file_and_line(built_index, tmp_path, capsys):
    labels = tmp_path / "x.txt"
    labels.write_text("imgId,prompt\na,a cat\nb,a dog\nc,a cat, a hat, a bat\n", encoding="utf-8")
    assert cli.main(["eval", str(built_index), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{labels}, line 4:" in err and "Expected" not in err, err


def test_an_offline_hub_model_is_our_one_line_only(caplog):
    """open_clip logs `ERROR root: Failed to download…` before it raises; the CLI showed both lines."""
    from img2prompt.encoders.models import load_clip

    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="could not load CLIP"):
        load_clip("ViT-B-32", "openai", device="cpu")
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
