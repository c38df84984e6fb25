"""The documentation site (docs/build.py): rendered from the notebooks as stored (nothing is executed, so this stays
fast), every page must build, and every internal link, fragment and image of every page must resolve inside the site."""
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from notebook_cells import ROOT, code, load_docs_tool, markdown, notebook

build_mod = load_docs_tool("build")
nbtools = load_docs_tool("notebooks")


class _Refs(HTMLParser):
    "Collects the ids, the links (a href) and the resources (img/script/link src or href) of one HTML page."

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.resources, self.imgs = set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "a" and attrs.get("href") is not None:
            self.links.append(attrs["href"])
        elif tag in ("img", "script", "source") and attrs.get("src"):
            self.resources.append(attrs["src"])
            self.imgs += tag == "img"
        elif tag == "link" and attrs.get("href"):
            self.resources.append(attrs["href"])


def _parse(path: Path) -> _Refs:
    refs = _Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    return refs


def _broken(site: Path) -> list[str]:
    "Every internal link, fragment or resource of the site that does not resolve, as 'page: url (why)'."
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    problems = []
    for page, refs in pages.items():
        for url in refs.links + refs.resources:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:  # http(s):, mailto:, data: and //host are not the site's
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.is_relative_to(site.resolve()):
                problems.append(f"{page.relative_to(site)}: {url} (outside the site)")
            elif not target.is_file():
                problems.append(f"{page.relative_to(site)}: {url} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if parts.fragment not in ids and unquote(parts.fragment) not in ids:  # as browsers: raw, then decoded
                    problems.append(f"{page.relative_to(site)}: {url} (no id {parts.fragment!r} in the page)")
    return problems


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "_docs"
    build_mod.build(out)
    return out


def test_every_page_builds(site):
    nav = build_mod.site_pages()
    assert nav[0].out == "index.html"
    assert [p.src.name for p in nav[1:len(nbtools.chapters()) + 1]] == [p.name for p in nbtools.chapters()]
    for page in nav:
        text = (site / page.out).read_text(encoding="utf-8")
        assert "<main>" in text and len(text) > 1000, page.out
    assert (site / "style.css").is_file()


def test_links_and_images_resolve(site):
    assert _broken(site) == []


def test_navigation_in_reading_order(site):
    nav = build_mod.site_pages()
    for i, page in enumerate(nav):
        refs = _parse(site / page.out)
        sidebar = [(site / Path(page.out).parent / u).resolve() for u in refs.links[1:len(nav) + 1]]
        assert sidebar == [(site / p.out).resolve() for p in nav], page.out
        pager = [(site / Path(page.out).parent / u).resolve() for u in refs.links[-2:]]
        if i + 1 < len(nav):
            assert pager[-1] == (site / nav[i + 1].out).resolve(), page.out
        if i > 0:
            assert (site / nav[i - 1].out).resolve() in pager, page.out


def test_figures_page_shows_its_figures(site):
    if not (ROOT / "figures" / "INDEX.md").exists():
        pytest.skip("no figures/INDEX.md")
    refs = _parse(site / "figures" / "index.html")
    linked = {u for u in refs.links if u.endswith(".png")}
    assert linked and linked <= set(refs.resources)


def test_links_rewritten_and_files_copied(tmp_path):
    "A small repository: notebook links become page links, a linked image is copied, a broken link is reported."
    (tmp_path / "nbs").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "figures" / "f 2.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "figures" / "INDEX.md").write_text("# Figures\n\nFiles: [f.png](f.png)\n")
    (tmp_path / "README.md").write_text("# Demo\n\nSee [the first chapter](nbs/00_a.ipynb).\n")
    png = {"output_type": "display_data", "metadata": {},
           "data": {"image/png": "iVBORw0KGgo=\n", "text/plain": ["<Figure size 1x1 with 0 Axes>"]}}
    a = notebook([markdown("# A\n\nNext: [B](01_b.ipynb#Part-two); ![fig](../figures/f.png) ![two](../figures/f%202.png)"),
             code("#| export\nx = 1", [png]), code("#| hide\nsecret = 2"), code("import nbdev; nbdev.nbdev_export()")])
    b = notebook([markdown("# B\n\n## Part two\n\n[missing](nowhere.ipynb), [home](../README.md)")])
    (tmp_path / "nbs" / "00_a.ipynb").write_text(json.dumps(a))
    (tmp_path / "nbs" / "01_b.ipynb").write_text(json.dumps(b))
    out = tmp_path / "_docs"
    pages = build_mod.build(out, root=tmp_path)
    assert [p.out for p in pages] == ["index.html", "00_a.html", "01_b.html", "figures/index.html"]
    page_a = (out / "00_a.html").read_text()
    assert 'href="01_b.html#Part-two"' in page_a and 'src="figures/f.png"' in page_a
    assert "#| export" not in page_a and "secret" not in page_a and "nbdev_export" not in page_a
    assert "data:image/png;base64" in page_a  # output images are embedded
    assert (out / "figures" / "f.png").is_file() and (out / "figures" / "f 2.png").is_file()
    assert 'src="figures/f%202.png"' in page_a
    assert _broken(out) == ["01_b.html: nowhere.ipynb (no such file)"]
    # a second build replaces the first; a folder the builder did not make is never replaced
    build_mod.build(out, root=tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_mod.build(other, root=tmp_path)
    assert (other / "notes.txt").read_text() == "keep"


def test_home_page_from_index_notebook(tmp_path):
    "With nbs/index.ipynb the home page is that notebook (not a chapter), and links to README.md lead to it."
    (tmp_path / "nbs").mkdir()
    (tmp_path / "README.md").write_text("# Demo\n")
    (tmp_path / "nbs" / "index.ipynb").write_text(json.dumps(notebook([markdown("# Welcome\n\nStart with [A](00_a.ipynb).")])))
    (tmp_path / "nbs" / "00_a.ipynb").write_text(json.dumps(notebook([markdown("# A\n\n[home](../README.md)")])))
    pages = build_mod.build(tmp_path / "site", root=tmp_path)
    assert [(p.src.name, p.out, p.title) for p in pages] == [("index.ipynb", "index.html", "Welcome"),
                                                             ("00_a.ipynb", "00_a.html", "A")]
    assert 'href="index.html">home</a>' in (tmp_path / "site" / "00_a.html").read_text()
    assert _broken(tmp_path / "site") == []
    assert [p.name for p in nbtools.notebooks(tmp_path / "nbs")] == ["00_a.ipynb", "index.ipynb"]
    assert [p.name for p in nbtools.chapters(tmp_path / "nbs")] == ["00_a.ipynb"]
