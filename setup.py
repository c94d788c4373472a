"""The recipes ship with the package: `configs/` (the repository's recipes, the paths the docs use) is copied into the
wheel as `mimkit/recipes/` (package data) at build time. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "configs"


class BuildWithRecipes(build_py):
    """build_py, plus configs/**/*.yaml -> <build>/mimkit/recipes/** (a source without configs/ builds without)."""

    def run(self):
        super().run()
        if not RECIPES.is_dir() or self.dry_run:
            return
        for src in sorted(RECIPES.rglob("*.yaml")):
            dst = Path(self.build_lib) / "mimkit" / "recipes" / src.relative_to(RECIPES)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildWithRecipes})
