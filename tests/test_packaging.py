"""Packaging as the ecosystem does it: the metadata in pyproject.toml (licence, classifiers, URLs, py.typed), the
wheel `pip wheel .` builds from it, and the optional extras (webdataset, tensorboard): a core install runs without
them, and a run that needs a missing one ends in one line naming `pip install 'mimkit[EXTRA]'`, before compute."""

from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_MODEL, one_error_line

import mimkit
from mimkit.cli import main
from mimkit.data import webdataset_urls
from mimkit.errors import MimkitError
from mimkit.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("webdataset", "braceexpand", "tensorboard")  # extras now, never core requirements


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dist_name(requirement: str) -> str:
    """'mimkit[all]' -> 'mimkit', 'timm>=1.0.9,<2' -> 'timm', 'PyYAML' -> 'pyyaml' (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def extra_closure(project: dict, extra: str) -> set[str]:
    """Distribution names an extra installs, self-references (mimkit[a,b]) followed."""
    names = set()
    for req in project["optional-dependencies"][extra]:
        if dist_name(req) == "mimkit":
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):
                names |= extra_closure(project, inner.strip())
        else:
            names.add(dist_name(req))
    return names


# ---------------------------------------------------------------- pyproject.toml


def test_pyproject_metadata():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # PEP 639 SPDX expression
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    for method in ("MAE", "EMAE", "BootMAE", "BEiT", "mc-BEiT", "SimMIM", "CrossMAE"):
        assert re.search(rf"\b{re.escape(method)}\b", project["description"]), method
    classifiers = project["classifiers"]
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    for c in ("Intended Audience :: Science/Research", "Intended Audience :: Developers",
              "Topic :: Scientific/Engineering :: Artificial Intelligence",
              "Topic :: Scientific/Engineering :: Image Recognition", "Typing :: Typed"):  # fmt: skip
        assert c in classifiers, c
    assert [c for c in classifiers if c.startswith("Programming Language :: Python :: 3.")] == [
        f"Programming Language :: Python :: 3.{minor}" for minor in range(10, 14)
    ]
    assert not any(c.startswith("License :: ") for c in classifiers)  # setuptools refuses them beside an expression
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    assert project["keywords"]
    urls = project["urls"]
    assert set(urls) >= {"Homepage", "Documentation", "Issues", "Changelog"}
    assert all(u.startswith("https://github.com/mimkit/mimkit") for u in urls.values()), urls
    assert (REPO / "CHANGELOG.md").is_file()
    assert (REPO / "mimkit" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["mimkit"]


def test_optional_packages_are_extras_and_dev_has_everything():
    project = pyproject()["project"]
    core = {dist_name(r) for r in project["dependencies"]}
    assert not core & set(OPTIONAL), core
    extras = project["optional-dependencies"]
    assert extra_closure(project, "webdataset") == {"webdataset", "braceexpand"}
    assert extra_closure(project, "tensorboard") == {"tensorboard"}
    every = extra_closure(project, "all")
    assert every >= extra_closure(project, "report") | extra_closure(project, "hf") | set(OPTIONAL), every
    dev = extra_closure(project, "dev")
    assert dev >= extra_closure(project, "all"), "dev (scripts/test.sh) installs every extra"
    for extra in extras:
        if extra != "dev":
            assert dev | core >= extra_closure(project, extra), extra

    # every third-party package the tests and the library import is a requirement or comes with an extra
    # (the tests with dev, the library's optional imports with the extra of their feature)
    local = {p.stem for d in ("tests", "benchmarks") for p in (REPO / d).glob("*.py")} | {"mimkit"}
    owners = importlib.metadata.packages_distributions()
    needed = {"tests": core | dev, "mimkit": core | extra_closure(project, "all")}
    for folder, provided in needed.items():
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                for top in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                    dists = {dist_name(d) for d in owners.get(top, [top])}
                    where = f"{path.relative_to(REPO)} imports {top} ({dists})"
                    assert dists & provided, f"{where}: not in the requirements of {folder}/"


# ---------------------------------------------------------------- the wheel


def test_wheel_metadata_and_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mimkit", src / "mimkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
               str(tmp_path / "dist"), str(src)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mimkit-*.whl")
    assert wheel.name.startswith(f"mimkit-{mimkit.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        licence = z.read(f"{info}/licenses/LICENSE").decode()
    assert "mimkit/py.typed" in names
    assert {"mimkit/__init__.py", "mimkit/methods/mae.py", "mimkit/eval/knn.py", "mimkit/interop/__init__.py"} <= names
    assert licence == (REPO / "LICENSE").read_text()
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert "SimMIM" in meta["Summary"] and "CrossMAE" in meta["Summary"]
    assert "Topic :: Scientific/Engineering :: Image Recognition" in meta.get_all("Classifier")
    labels = {u.split(",")[0] for u in meta.get_all("Project-URL")}
    assert labels >= {"Homepage", "Documentation", "Issues", "Changelog"}, labels
    assert meta["Requires-Python"] == ">=3.10"
    requires = meta.get_all("Requires-Dist")
    unconditional = {dist_name(r) for r in requires if "extra ==" not in r}
    assert {"torch", "timm", "scikit-image"} <= unconditional and not unconditional & set(OPTIONAL), unconditional
    conditional = {(dist_name(r), re.search(r'extra == "([^"]+)"', r).group(1)) for r in requires if "extra ==" in r}
    assert {("webdataset", "webdataset"), ("braceexpand", "webdataset"), ("tensorboard", "tensorboard")} <= conditional
    assert set(meta.get_all("Provides-Extra")) >= {"webdataset", "tensorboard", "report", "hf", "all", "dev"}


# ---------------------------------------------------------------- a missing extra: one line naming it


@pytest.fixture
def no_webdataset(monkeypatch):
    for name in ("webdataset", "braceexpand"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as if not installed


@pytest.fixture
def no_tensorboard(monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_webdataset_in_process(no_webdataset, tmp_path):
    with pytest.raises(MimkitError) as e:
        webdataset_urls(f"{tmp_path}/shards-{{000..001}}.tar")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.path: {tmp_path}/shards-{{000..001}}.tar is WebDataset shards")
    assert msg.endswith("pip install 'mimkit[webdataset]'"), msg


def test_missing_tensorboard_in_process(no_tensorboard, tmp_path):
    with pytest.raises(MimkitError) as e:
        MetricsLog(tmp_path, True, True)
    assert str(e.value) == ("train.tensorboard: TensorBoard logging needs the tensorboard package: "
                            "pip install 'mimkit[tensorboard]' (or train.tensorboard=false)")  # fmt: skip
    assert isinstance(e.value, ImportError)  # a MissingExtra is an ImportError too
    log = MetricsLog(tmp_path, True, False)  # without TensorBoard: the JSONL only
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def run_args(tmp_path, data: str, *extra: str) -> list[str]:
    return ["pretrain", *TINY_MODEL, f"data.path={data}", "data.num_workers=0", "train.batch_size=8",
            "train.max_steps=1", "train.precision=fp32", "train.progress=false", "train.device=cpu",
            f"train.out_dir={tmp_path / 'run'}", *extra]  # fmt: skip


def test_missing_webdataset_through_the_cli(no_webdataset, tmp_path, capsys):
    shards = f"{tmp_path}/shards-{{000..001}}.tar"
    assert main(run_args(tmp_path, shards, "data.num_samples=16", "train.tensorboard=false")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mimkit: error: data.path: {shards} is WebDataset shards")
    assert line.endswith("pip install 'mimkit[webdataset]'"), line
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_missing_tensorboard_through_the_cli(no_tensorboard, npz_data, tmp_path, capsys, caplog):
    # the default (train.tensorboard: auto) trains without it, as a core install does, and says so
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert main(run_args(tmp_path, npz_data, "train.out_dir=" + str(tmp_path / "auto"))) == 0
    assert any(r.getMessage().startswith("no TensorBoard logs: TensorBoard logging needs the tensorboard package")
               for r in caplog.records)  # fmt: skip
    assert not (tmp_path / "auto" / "tb").exists() and (tmp_path / "auto" / "metrics.jsonl").is_file()
    capsys.readouterr()
    # asked for by name, it is required
    assert main(run_args(tmp_path, npz_data, "train.tensorboard=true")) == 2
    expected = ("mimkit: error: train.tensorboard: TensorBoard logging needs the tensorboard package: "
                "pip install 'mimkit[tensorboard]' (or train.tensorboard=false)")  # fmt: skip
    assert one_error_line(capsys) == expected
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # before any step
    assert main(run_args(tmp_path, npz_data, "train.tensorboard=false", "train.out_dir=" + str(tmp_path / "off"))) == 0


def test_readme_install_names_every_extra_and_the_cpu_index():
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Install") :]
    install = install[: install.index("\n## ", 1)]
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in install
    for extra in pyproject()["project"]["optional-dependencies"]:
        if extra != "bench":  # benchmarks/ only, not a user's install
            assert f"`mimkit[{extra}]`" in install, extra
    assert re.search(r'pip install (-q )?-e "\.\[dev\]"', (REPO / "scripts" / "test.sh").read_text())
