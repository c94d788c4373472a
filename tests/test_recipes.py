"""The recipes ship with the package: the wheel holds them as mimkit/recipes, `mimkit recipes` lists them, a bare name
stands for the shipped recipe wherever a recipe file goes, and no recipe at all says the schedule is ImageNet's."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mimkit.cli import main, resolve_recipe, shipped_recipes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps --no-build-isolation` of a copy of the source (pyproject, setup.py, mimkit, configs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in ("mimkit", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "recipes"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
               str(tmp / "dist"), str(src)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (found,) = (tmp / "dist").glob("mimkit-*.whl")
    return found


def test_the_wheel_holds_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"mimkit/recipes/{p.relative_to(REPO / 'configs').as_posix()}" for p in (REPO / "configs").rglob("*.yaml")
    }
    assert expected and expected <= names, sorted(expected - names)
    assert "mimkit/recipes/eval/knn_vit_tiny_cifar10.yaml" in names


def test_a_recipe_by_name_from_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel, installed by unpacking
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mimkit.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    listed = run("recipes")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert str(site / "mimkit" / "recipes") in listed.stdout  # the installed copy, not the repository's
    assert "mae_vit_tiny_cifar10" in listed.stdout and "knn_vit_tiny_cifar10" in listed.stdout
    shown = run("pretrain", "mae_vit_tiny_cifar10", "--print-config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "arch: vit_tiny_patch4_32" in shown.stdout and "no recipe" not in shown.stderr
    knn = run("knn", "knn_vit_tiny_cifar10", "--print-config")
    assert knn.returncode == 0 and "encoder:" in knn.stdout, knn.stderr[-2000:]


def test_recipes_lists_names_and_first_lines(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, path in {**shipped_recipes(), **shipped_recipes("eval")}.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert path.read_text().splitlines()[0].lstrip("# ")[:30] in line


def test_a_name_resolves_for_every_command_and_a_path_stays_a_path(tmp_path, monkeypatch):
    assert resolve_recipe("mae_vit_tiny_cifar10") == str(shipped_recipes()["mae_vit_tiny_cifar10"])
    assert resolve_recipe("tokenizer_cifar10.yaml").endswith("tokenizer_cifar10.yaml")
    assert resolve_recipe("linprobe_vit_tiny_cifar10", "eval").endswith("eval/linprobe_vit_tiny_cifar10.yaml")
    assert resolve_recipe("configs/quickstart.yaml") == "configs/quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("train:\n  epochs: 3\n")  # an existing file wins over the shipped name
    assert resolve_recipe("quickstart") == "quickstart"


def test_an_unknown_name_is_one_line(capsys):
    assert main(["finetune", "no_such_recipe", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_recipe" in err[0] and "mimkit recipes" in err[0]


def test_no_recipe_warns_that_the_schedule_is_imagenets(caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        assert main(["pretrain", "--print-config"]) == 0
    warned = [r.getMessage() for r in caplog.records if "no recipe" in r.getMessage()]
    assert len(warned) == 1 and "800 epochs" in warned[0] and "40 warmup" in warned[0] and "mimkit recipes" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        assert main(["pretrain", "quickstart", "--print-config"]) == 0
        assert main(["pretrain", "--print-config", "train.epochs=2", "optim.warmup_epochs=0"]) == 0
    assert not [r for r in caplog.records if "no recipe" in r.getMessage()]


def test_the_fast_recipe_is_mae_s_with_the_measured_changes_and_nothing_else():
    """configs/mae_fast_vit_tiny_cifar10.yaml is the run docs/results/study.md#fast-recipe measured (J): MAE's recipe
    with a one-block decoder, on the 3-epoch schedule the study gave MAE (warmup a tenth), stopped at 1,150 steps."""
    from mimkit.config import load_config

    fast = load_config(str(REPO / "configs" / "mae_fast_vit_tiny_cifar10.yaml"), [])
    measured = load_config(str(REPO / "configs" / "mae_vit_tiny_cifar10.yaml"),
                           ["mae.decoder_depth=1", "train.epochs=3", "optim.warmup_epochs=0.3", "train.max_steps=1150",
                            f"train.out_dir={fast.train.out_dir}"])  # fmt: skip
    assert fast == measured
    assert load_config(str(REPO / "configs" / "mae_vit_tiny_cifar10.yaml"), []).mae.decoder_depth == 4
