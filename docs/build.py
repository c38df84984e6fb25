"""Render mcsae's documentation to a static HTML site with nbconvert (no Quarto).

    python docs/build.py [--out _docs]      # what `make docs` runs after `docs/notebooks.py store`

The site is made of the notebooks as they are stored: nothing is executed here (refresh the outputs first with
`python docs/notebooks.py store`, which `make docs` does). Pages:
* the home page `index.html`, from `nbs/index.ipynb` if it exists, else from README.md;
* the chapters, every other `nbs/*.ipynb` in name order, as `NAME.html`;
* `figures/index.html`, from `figures/INDEX.md` if it exists, with each figure it links shown inline;
* any other notebook or markdown file of the repository that a page links to, rendered the same way.
Each page has a sidebar (home, chapters, figures) and previous/next links in reading order. Links between
notebooks (`01_sae.ipynb#SAE`) become links between pages (`01_sae.html#SAE`); other repository files a page links
to or shows (images, PDFs, CSVs) are copied into the site at their repository path; output images are embedded.
Code cells are shown without their `#|` directives; `#| hide` cells and the `nbdev_export()` cell are left out,
`#| echo: false` shows only the output and `#| output: false` only the code.

This is tooling, not library code: mcsae itself never imports nbconvert (a dev requirement).
"""
from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebooks as nbtools  # docs/notebooks.py: which notebooks are chapters

ROOT = nbtools.ROOT
MARKER = ".mcsae-docs"  # marks a folder this builder made, so that it may replace it
PROJECT = "mcsae"


@dataclass
class Page:
    "One page of the site: its source file in the repository and where it goes in the site."
    src: Path     # repository file (.ipynb or .md)
    out: str      # site path, posix, e.g. "01_sae.html" or "figures/index.html"
    title: str = ""
    in_nav: bool = True


def _title(src: Path) -> str:
    "The first level-1 heading of a notebook's markdown or a markdown file, else the file name."
    if src.suffix == ".ipynb":
        import nbformat
        nb = nbformat.read(src, as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    else:
        text = src.read_text(encoding="utf-8")
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match.group(1).strip() if match else src.stem


def site_pages(root: Path = ROOT) -> list[Page]:
    "The pages of the navigation, in reading order: home, chapters, figures."
    nbs = root / "nbs"
    home = nbs / nbtools.INDEX_NB
    pages = [Page(home if home.exists() else root / "README.md", "index.html")]
    pages += [Page(p, p.stem + ".html") for p in nbtools.chapters(nbs)]
    if (root / "figures" / "INDEX.md").exists():
        pages.append(Page(root / "figures" / "INDEX.md", "figures/index.html"))
    for page in pages:
        page.title = _title(page.src)
    return pages


# ---------------------------------------------------------------- notebook to HTML

def _directives(source: str) -> tuple[dict[str, str], str]:
    "The leading `#| key: value` directives of a code cell and the source without them."
    lines = source.splitlines(True)
    found: dict[str, str] = {}
    n = 0
    while n < len(lines) and (lines[n].startswith("#|") or not lines[n].strip()):
        if lines[n].startswith("#|"):
            key, _, value = lines[n][2:].strip().partition(" ")
            found[key.rstrip(":")] = value.strip()
        n += 1
    return found, "".join(lines[n:]).rstrip("\n")


def prepare(nb) -> None:
    "Drop hidden cells and directives from `nb`, as a reader should see it (in place)."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            found, source = _directives(cell.source)
            if "hide" in found or "nbdev_export" + "(" in source:
                continue
            cell.source = source
            if found.get("echo", "").lower() == "false":
                cell.metadata.setdefault("tags", []).append("remove_input")
            if found.get("output", "").lower() == "false":
                cell.outputs = []
            if not source and not cell.outputs:
                continue
        cells.append(cell)
    nb.cells = cells


def _exporter():
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    exporter = HTMLExporter(template_name="basic", exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"},
                                                         remove_cell_tags={"remove_cell"}), enabled=True)
    return exporter


def body_html(src: Path, exporter) -> str:
    "The HTML body of a notebook or markdown file (a markdown file is rendered as a one-cell notebook)."
    import nbformat
    if src.suffix == ".ipynb":
        nb = nbformat.read(src, as_version=4)
    else:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(src.read_text(encoding="utf-8"))])
    prepare(nb)
    body, _ = exporter.from_notebook_node(nb)
    return body


# ---------------------------------------------------------------- links

_ATTR = re.compile(r'(\s(?:href|src)=")([^"]*)(")')
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")  # http:, mailto:, data:, //host, #fragment


def _rel_url(target: str, page_out: str) -> str:
    "The URL of site path `target` from the page at site path `page_out`."
    return os.path.relpath(target, os.path.dirname(page_out) or ".").replace(os.sep, "/")


class Site:
    "Renders pages into a folder; pages that pages link to are rendered or copied on the way."

    def __init__(self, root: Path, out: Path):
        self.root, self.out = root.resolve(), out
        self.nav = site_pages(self.root)
        self.by_src = {p.src.resolve(): p for p in self.nav}
        home = self.nav[0]
        readme = (self.root / "README.md").resolve()
        if home.src.resolve() != readme:  # README.md mirrors the home notebook (nbdev's readme_nb)
            self.by_src[readme] = home
        self.queue = list(self.nav)
        self.copied: set[str] = set()
        self.exporter = _exporter()

    def _page_for(self, src: Path) -> Page:
        "The page of repository file `src`, added to the queue if it is not one yet."
        if src not in self.by_src:
            rel = src.relative_to(self.root).with_suffix(".html").as_posix()
            page = Page(src, rel, _title(src), in_nav=False)
            self.by_src[src] = page
            self.queue.append(page)
        return self.by_src[src]

    def link(self, url: str, page: Page) -> str:
        "`url` as written in `page`'s source, rewritten to work in the site."
        if not url or _EXTERNAL.match(url):
            return url
        path, hash_, fragment = html.unescape(url).partition("#")
        path = unquote(path.split("?")[0])  # `my%20figure.png` names `my figure.png`
        target = (page.src.parent / path).resolve()
        if not target.is_relative_to(self.root) or not target.exists():
            return url  # left as written: tests/test_docs.py reports it
        if target.is_dir() and (target / "README.md").exists():
            target = target / "README.md"
        if target.is_dir():
            return url
        if target.suffix in (".ipynb", ".md"):
            dest = self._page_for(target).out
        else:
            dest = target.relative_to(self.root).as_posix()
            if dest not in self.copied:
                (self.out / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, self.out / dest)
                self.copied.add(dest)
        return html.escape(quote(_rel_url(dest, page.out)) + hash_ + fragment)

    def rewrite(self, body: str, page: Page) -> str:
        return _ATTR.sub(lambda m: m.group(1) + self.link(m.group(2), page) + m.group(3), body)

    def render(self, page: Page) -> None:
        body = self.rewrite(body_html(page.src, self.exporter), page)
        if page.src.name == "INDEX.md" and page.src.parent.name == "figures":
            body = show_linked_images(body)
        target = self.out / page.out
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(layout(page, body, self.nav), encoding="utf-8")

    def build(self) -> list[Page]:
        done = []
        while self.queue:
            page = self.queue.pop(0)
            self.render(page)
            done.append(page)
        (self.out / "style.css").write_text(stylesheet(), encoding="utf-8")
        (self.out / MARKER).write_text("made by docs/build.py; `make docs` replaces this folder\n")
        return done


def show_linked_images(body: str) -> str:
    "After each paragraph or list item that links PNG/SVG/JPEG files, show them (a figure index links its files)."
    def add(match: re.Match) -> str:
        imgs = re.findall(r'href="([^"]+\.(?:png|svg|jpe?g))"', match.group(0))
        figs = "".join(f'<p class="figure"><img src="{src}" alt="{src}"></p>' for src in dict.fromkeys(imgs))
        return match.group(0) + figs
    return re.sub(r"<p>(?:(?!</p>).)*?</p>", add, body, flags=re.DOTALL)


# ---------------------------------------------------------------- page layout

def layout(page: Page, body: str, nav: list[Page]) -> str:
    "A full HTML page: sidebar, previous/next links, the body."
    def url(target: Page) -> str:
        return html.escape(_rel_url(target.out, page.out))
    items = []
    for i, entry in enumerate(nav):
        current = ' class="current" aria-current="page"' if entry.out == page.out else ""
        label = "Home" if i == 0 else entry.title
        items.append(f'<li{current}><a href="{url(entry)}">{html.escape(label)}</a></li>')
    pager = ""
    if page.in_nav:
        i = [p.out for p in nav].index(page.out)
        prev = f'<a class="prev" href="{url(nav[i - 1])}">← {html.escape(nav[i - 1].title)}</a>' if i > 0 else "<span></span>"
        nxt = (f'<a class="next" href="{url(nav[i + 1])}">{html.escape(nav[i + 1].title)} →</a>'
               if i + 1 < len(nav) else "<span></span>")
        pager = f'<nav class="pager">{prev}{nxt}</nav>'
    title = page.title if page.title == PROJECT else f"{page.title} — {PROJECT}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{html.escape(_rel_url('style.css', page.out))}">
<script>window.MathJax = {{tex: {{inlineMath: [['$', '$'], ['\\\\(', '\\\\)']]}}}};</script>
<script async src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>
</head>
<body>
<nav class="sidebar">
<a class="brand" href="{url(nav[0])}">{PROJECT}</a>
<ol>
{chr(10).join(items)}
</ol>
</nav>
<main>
{body}
{pager}
</main>
</body>
</html>
"""


def stylesheet() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style="default").get_style_defs(".highlight") + """
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; }
.sidebar { position: fixed; top: 0; bottom: 0; left: 0; width: 15rem; overflow-y: auto; padding: 1.2rem 1rem;
           background: #f6f8fa; border-right: 1px solid #d0d7de; box-sizing: border-box; }
.sidebar .brand { font-weight: 700; font-size: 1.3rem; color: inherit; text-decoration: none; }
.sidebar ol { padding-left: 1.2rem; font-size: 0.93rem; }
.sidebar li { margin: 0.35rem 0; }
.sidebar li.current a { font-weight: 700; color: inherit; }
main { margin-left: 15rem; padding: 1rem 2.5rem 3rem; max-width: 58rem; }
a { color: #0969da; }
pre { background: #f6f8fa; padding: 0.6rem 0.8rem; overflow-x: auto; font-size: 0.86rem; line-height: 1.4; }
.input_area pre { border-left: 3px solid #0969da; }
.output_area pre { background: #fff; border-left: 3px solid #d0d7de; }
.output_stderr pre { background: #fff8f0; }
.output_area img, .figure img { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 1rem 0; } th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; }
blockquote { margin: 0; padding: 0 1rem; color: #57606a; border-left: 4px solid #d0d7de; }
.anchor-link { visibility: hidden; margin-left: 0.3rem; text-decoration: none; }
h1:hover .anchor-link, h2:hover .anchor-link, h3:hover .anchor-link { visibility: visible; }
.pager { display: flex; justify-content: space-between; margin-top: 3rem; padding-top: 1rem; border-top: 1px solid #d0d7de; }
@media (max-width: 50rem) { .sidebar { position: static; width: auto; } main { margin-left: 0; padding: 1rem; } }
"""


# ---------------------------------------------------------------- entry point

def build(out: Path, root: Path = ROOT) -> list[Page]:
    """Render the site into `out`, replacing a folder this builder made before (never another folder).

    The site is built in a temporary folder beside `out` and moved into place at the end, so an error leaves the
    previous site as it was."""
    out = Path(out).resolve()
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and was not made by docs/build.py; remove it or pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        pages = Site(root, tmp).build()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_docs", help="folder to write the site to (default _docs)")
    args = parser.parse_args(argv)
    try:
        pages = build(args.out)
    except FileExistsError as e:
        print(f"docs/build.py: {e}", file=sys.stderr)
        return 2
    print(f"{len(pages)} pages in {args.out}; open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
