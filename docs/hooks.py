"""MkDocs hooks (mkdocs.yml `hooks:`): the generated pages are rendered from the code at build time.

- `reference/cli.md` and `reference/config.md` come from docs/gen_reference.py (the files in docs/reference/ are
  the same text, committed so that links resolve on GitHub; tests/test_docs.py checks they are current);
- `results/benchmarks.md` includes benchmarks/RESULTS.md, the benchmark tables kept beside their scripts;
- any page's `<!-- include: PATH -->` line becomes that file of the repository (e.g. a study's compare.md, as the
  study command wrote it), its headings moved below the page's.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    name = "mimkit_docs_gen_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "gen_reference.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def on_page_read_source(page, config):
    name = page.file.src_uri
    if name in ("reference/cli.md", "reference/config.md"):
        return _generator().PAGES[name]()
    if name == "results/benchmarks.md":
        head = (ROOT / "docs" / name).read_text()
        body = (ROOT / "benchmarks" / "RESULTS.md").read_text()
        return head.split("<!-- RESULTS.md -->")[0] + demote(body)
    return None


INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.MULTILINE)


def on_page_markdown(markdown, page, config, files):
    def included(match: re.Match) -> str:
        path = ROOT / match.group(1)
        if not path.is_file():  # mkdocs build --strict shows the warning as an error
            raise FileNotFoundError(f"{page.file.src_uri}: <!-- include: {match.group(1)} -->: no such file")
        return demote(demote(path.read_text()))  # the file's "#" title under the page's "##" sections

    return INCLUDE.sub(included, markdown)


def demote(markdown: str) -> str:
    """RESULTS.md's headings one level down, below the page's own title (code blocks left alone)."""
    out, fence = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        out.append("#" + line if line.startswith("#") and not fence else line)
    return "\n".join(out) + "\n"
