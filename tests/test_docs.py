"""The documentation: the site builds strictly, the references are generated from the code and complete, every
relative link of the README and the docs resolves, the README's Python example runs on a fresh clone, and a built
page renders in headless Chromium."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
from conftest import TINY_MODEL, chromium_dom

from mimkit.config import Config, config_keys
from mimkit.eval.config import FinetuneConfig, KnnConfig, LinprobeConfig

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def load_generator():
    name = "mimkit_docs_gen_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "gen_reference.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`mkdocs build --strict` into a temporary folder (mkdocs-material and mkdocstrings come with the dev extra)."""
    out = tmp_path_factory.mktemp("site")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page(site):
    nav = re.findall(r":\s+(\S+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.MULTILINE)
    assert len(nav) >= 19
    for page in nav:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(nav), "every docs page is in the nav, and only those"
    api = (site / "reference/api/index.html").read_text()
    for name in ("mimkit.run", "mimkit.pretrain", "mimkit.load_config", "mimkit.eval.evaluate", "mimkit.RunStopped",
                 "mimkit.train.RunResult", "mimkit.eval.common.EvalResult"):  # fmt: skip
        assert f'id="{name}"' in api, name
    # the references are rendered from the code at build time, and benchmarks/RESULTS.md is included
    config = (site / "reference/config/index.html").read_text()
    assert "train.loggers" in config and "encoder.checkpoint" in config
    assert "Interleaved rounds" in (site / "results/benchmarks/index.html").read_text()


def test_the_committed_references_are_the_generated_ones():
    """The site renders them from the code; the committed copies (for GitHub) are checked here. The config reference
    must match exactly; the CLI one in every subcommand and option, since argparse's layout varies with Python."""
    gen = load_generator()
    stale = "is stale: run `python docs/gen_reference.py`"
    assert (DOCS / "reference/config.md").read_text() == gen.config_reference(), f"reference/config.md {stale}"
    from mimkit.cli import build_parser

    cli = (DOCS / "reference/cli.md").read_text()
    for name, sub in [("mimkit", build_parser()), *gen._subcommands(build_parser(), "mimkit")]:
        assert f"## `{name}`" in cli, f"reference/cli.md {stale} ({name})"
        section = cli.split(f"## `{name}`\n", 1)[1].split("\n## `", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                assert option in section, f"reference/cli.md {stale} ({name} {option})"


def reference_keys(markdown: str) -> dict[str, set[str]]:
    """Command title -> the keys of its tables in the config reference."""
    out, command = {}, None
    for line in markdown.splitlines():
        if m := re.match(r"^## `(mimkit \w+)`", line):
            command = m.group(1)
            out[command] = set()
        elif command and (m := re.match(r"^\| `([\w.]+)` \|", line)):
            out[command].add(m.group(1))
    return out


def dotted_keys(cls, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass, its nested sections found through the resolved annotations."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):  # not a key a user writes
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_the_config_reference_has_every_key_of_every_command():
    keys = reference_keys((DOCS / "reference/config.md").read_text())
    assert keys["mimkit pretrain"] == config_keys(Config)
    for command, cls in {"mimkit pretrain": Config, "mimkit knn": KnnConfig, "mimkit linprobe": LinprobeConfig,
                         "mimkit finetune": FinetuneConfig}.items():  # fmt: skip
        assert keys[command] == dotted_keys(cls), command
    assert "train.loggers" in keys["mimkit pretrain"] and "train.out_dir" in keys["mimkit knn"]


def test_the_cli_reference_has_every_subcommand():
    from mimkit.cli import build_parser

    cli = (DOCS / "reference/cli.md").read_text()
    names = re.findall(r"^## `mimkit ([\w ]+)`", cli, re.MULTILINE)
    parser = build_parser()
    top = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(top.choices) <= set(names)
    assert "tokenizer train" in names
    assert "--print-config" in cli and "--dry-run" in cli


def test_every_config_field_has_a_description():
    gen = load_generator()
    missing = [f"{cls.__name__}: {doc.key}" for cls in gen.config_classes().values() for doc in gen.field_docs(cls)
               if not doc.description.strip()]  # fmt: skip
    assert not missing, (
        "config fields without a description (a # comment beside or above the field, or a "
        f"'Fields:' entry in the dataclass docstring): {missing}"
    )


def test_a_field_without_a_description_is_found(tmp_path, monkeypatch):
    """The check above bites: a field with no comment and no docstring entry has an empty description."""
    source = textwrap.dedent('''
        from __future__ import annotations
        from dataclasses import dataclass, field

        @dataclass
        class Section:
            """A section.

            Fields:
                from_docstring: described in the docstring
            """
            beside: int = 1  # described beside
            # described above
            above: int = 2
            from_docstring: float = 0.5

            undescribed: str = "x"

        @dataclass
        class Top:
            section: Section = field(default_factory=Section)
    ''')  # fmt: skip
    (tmp_path / "docs_probe_config.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("docs_probe_config")
    docs = {d.key: d for d in load_generator().field_docs(module.Top)}
    assert docs["section.beside"].description == "described beside"
    assert docs["section.above"].description == "described above"
    assert docs["section.from_docstring"].description == "described in the docstring"
    assert docs["section.undescribed"].description == ""
    assert (docs["section.beside"].type, docs["section.beside"].default) == ("int", "1")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(markdown: str) -> list[str]:
    """The relative targets of a page's Markdown links and images, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    checked = 0
    for page in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for target in relative_links(page.read_text()):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(REPO)}: {target} does not resolve"
            if page.is_relative_to(DOCS):  # the site holds docs/ only
                assert path.is_relative_to(DOCS), f"{page.relative_to(REPO)}: {target} leaves docs/"
            checked += 1
    assert checked >= 40
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for note in (r"shared/reference", r"(?<!docs/)methods\.md", r"calibration\.md", r"issue \d"):  # notes users lack
        assert not re.search(note, readme), note


def test_the_readme_python_example_runs_on_a_fresh_clone(tmp_path, monkeypatch, one_thread):
    """README "From Python", as written, in a folder holding only the repository's configs/ (no data): a tiny
    model and two steps stand in for the quickstart's size and length."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## From Python\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert code.count("\n") <= 25 and 'mimkit.run("configs/quickstart.yaml"' in code
    quick = ["train.max_steps=2", "train.progress=false", "train.tensorboard=false", "data.num_workers=0"]
    call = '"train.out_dir=runs/readme"])'
    assert call in code
    code = code.replace(call, '"train.out_dir=runs/readme", *quick])')
    code = code.replace('"train.out_dir=runs/readme_knn"]', '"train.out_dir=runs/readme_knn", *quiet]')
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    scope = {"quick": TINY_MODEL + quick, "quiet": ["train.progress=false", "train.tensorboard=false",
                                                    "data.num_workers=0"]}  # fmt: skip
    exec(code, scope)  # noqa: S102 - the README's own example
    assert scope["result"].step == 2 and scope["result"].checkpoint.is_file()
    assert scope["ev"].metrics_path == Path("runs/readme_knn/metrics.json") and scope["ev"].metrics_path.is_file()
    assert scope["ev"].metrics["val_images"] == 200 and 0 <= scope["ev"].metrics["top1"] <= 100


PROBE = ('<script>window.addEventListener("load", () => {'
         'const b = document.body, h = document.querySelector("article h1"), s = document.querySelector(".md-header");'
         'b.setAttribute("data-h1", h && h.offsetHeight > 0 ? h.innerText : "");'
         'b.setAttribute("data-header", s ? getComputedStyle(s).position : "");'
         'b.setAttribute("data-tables", document.querySelectorAll("article table").length);'
         '});</script>')  # fmt: skip


@pytest.mark.chromium
def test_chromium_renders_the_built_front_page(site, tmp_path):
    # the probe beside index.html, so that its stylesheets and scripts resolve the same
    dom = chromium_dom(site / "index.html", PROBE, site / "probe.html", tmp_path / "profile")
    assert "<title>mimkit</title>" in dom, dom[-500:]
    assert re.search(r'data-h1="mimkit', dom), dom[-500:]  # the page's heading is on screen
    assert re.search(r'data-header="sticky"', dom), dom[-500:]  # Material's stylesheet applied
    assert re.search(r'data-tables="[1-9]', dom)
