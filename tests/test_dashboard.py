"""Feature dashboards: the streaming summaries against brute-force references, the site's files, and the pages in a real
browser (headless Chromium through selenium; skipped when Chromium is absent unless MCSAE_REQUIRE_BROWSER=1)."""
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch

from mcsae.cli import main
from mcsae.dashboard import (ContextLayout, DashboardConfig, FeatureCollector, TopN, collect, histogram_update,
                             topn_merge)
from mcsae.dashboard_site import build_dashboard, site_files
from mcsae.io import UserError
from mcsae.models import ActivationConfig
from mcsae.sae import SAE
from mcsae.store import build_cache, open_cache
from mcsae.train import CacheSource, TrainConfig, train
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _reference_top(feature, key, row, n_features, n):
    "Per feature, rows of the n largest keys, earlier rows first on ties (plain Python)."
    out = [[] for _ in range(n_features)]
    for f, k, r in sorted(zip(feature.tolist(), key.tolist(), row.tolist()), key=lambda t: (t[0], -t[1], t[2])):
        if len(out[f]) < n:
            out[f].append(r)
    return out


@pytest.mark.parametrize("levels", [3, 0])  # 3: heavy ties; 0: continuous values
def test_streaming_topn_equals_brute_force(levels):
    g = torch.Generator().manual_seed(levels)
    F_, n, rows_n, per_row = 50, 7, 3000, 4
    row = torch.arange(rows_n).repeat_interleave(per_row)  # pairs in row order, as an allocation gives them
    feature = torch.stack([torch.randperm(F_, generator=g)[:per_row] for _ in range(rows_n)]).flatten()  # distinct per row
    value = torch.rand(row.numel(), generator=g)
    if levels:
        value = (value * levels).floor() + 1
    table = TopN(F_, n, width=1)
    cuts = sorted({0, row.numel(), *torch.randint(0, row.numel(), (12,), generator=g).tolist()})
    for a, b in zip(cuts[:-1], cuts[1:]):
        table.update(feature[a:b], value[a:b], row[a:b], value[a:b])
    want = _reference_top(feature, value, row, F_, n)
    assert [[r for r in rs if r >= 0] for rs in table.rows.tolist()] == want
    of_pair = {(r, f): v for r, f, v in zip(row.tolist(), feature.tolist(), value.tolist())}
    for f in range(F_):  # values follow their rows; empty slots hold 0
        for r, v in zip(table.rows[f].tolist(), table.values[f].tolist()):
            assert v == (of_pair[(r, f)] if r >= 0 else 0.0)


def test_topn_merge_reports_sources_and_empty_slots():
    keys, rows = torch.full((3, 2), -float("inf")), torch.full((3, 2), -1)
    feature, key, row = torch.tensor([0, 0, 0, 2]), torch.tensor([1.0, 3.0, 2.0, 5.0]), torch.tensor([10, 11, 12, 13])
    k, r, old, new = topn_merge(keys, rows, feature, key, row)
    assert r.tolist() == [[11, 12], [-1, -1], [13, -1]] and k[0].tolist() == [3.0, 2.0]
    assert new.tolist() == [[1, 2], [-1, -1], [3, -1]] and torch.equal(old >= 0, new < 0)  # each slot has one source
    k2, r2, old2, new2 = topn_merge(k, r, torch.tensor([0, 1]), torch.tensor([2.0, 0.5]), torch.tensor([20, 21]))
    assert r2.tolist() == [[11, 12], [21, -1], [13, -1]]  # the tie at 2.0 keeps the earlier row 12
    assert old2[0].tolist() == [0, 1] and new2[1, 0] == 1


def test_uniform_samples_are_a_uniform_subset():
    "The reservoir of a feature holds distinct firings; over many seeds each firing is picked equally often."
    F_, n = 1, 5
    rows = torch.arange(20)
    hits = torch.zeros(20)
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        table = TopN(F_, n, width=1)
        for a in range(0, 20, 6):
            table.update(torch.zeros(len(rows[a:a + 6]), dtype=torch.long), torch.rand(len(rows[a:a + 6]), generator=g),
                         rows[a:a + 6], rows[a:a + 6].float())
        got = table.rows[0].tolist()
        assert len(set(got)) == n and all(0 <= r < 20 for r in got)
        hits[got] += 1
    expected = 400 * n / 20  # 100 each
    assert (hits - expected).abs().max() < 5 * expected ** 0.5  # binomial spread, far from any bias


def test_histogram_counts_match_numpy():
    g = torch.Generator().manual_seed(3)
    F_, bins = 6, 32
    counts, exps = torch.zeros(F_, bins, dtype=torch.long), torch.full((F_,), -(10**6))
    fs, vs = [], []
    for i in range(20):  # scales grow over the stream, so ranges are widened many times
        f = torch.randint(0, F_, (300,), generator=g)
        v = torch.rand(300, generator=g) * (1.5 ** i) * (f + 1)
        counts, exps = histogram_update(counts, exps, f, v)
        fs.append(f); vs.append(v)
    f_all, v_all = torch.cat(fs), torch.cat(vs)
    for f in range(F_):
        v = v_all[f_all == f].numpy()
        hi = 2.0 ** int(exps[f])
        assert v.max() < hi <= 2 * v.max()
        assert counts[f].tolist() == np.histogram(v, bins=bins, range=(0, hi))[0].tolist()
    assert int(counts.sum()) == len(v_all)


def test_collector_equals_dense_reference():
    "Counts, sums, maxima, top rows and their context windows against a dense [tokens, F] computation."
    g = torch.Generator().manual_seed(4)
    N, T, F_ = 30, 10, 12
    keep = np.ones((N, T), dtype=bool)
    keep[:, 0] = False  # BOS not encoded
    layout = ContextLayout(keep)
    n_rows = len(layout)
    dense = torch.rand(n_rows, F_, generator=g) * (torch.rand(n_rows, F_, generator=g) < 0.3)  # [n, F]
    cfg = DashboardConfig(n_top=5, n_samples=4, left=2, right=1, n_bins=16)
    col = FeatureCollector(F_, layout, cfg)
    for c0 in range(0, N, 7):  # batches of whole contexts
        r0, r1 = int(layout.starts[c0]), int(layout.starts[min(c0 + 7, N)])
        token, feature = dense[r0:r1].nonzero(as_tuple=True)
        col.add(r0, r1 - r0, token, feature, dense[r0:r1][token, feature])
    assert col.n_tokens == n_rows and torch.equal(col.count, (dense > 0).sum(0))
    assert torch.allclose(col.total, dense.double().sum(0)) and torch.equal(col.max, dense.max(0).values)
    assert torch.equal(col.l0_hist, torch.bincount((dense > 0).sum(1)))
    for f in range(F_):
        ref = torch.sort(dense[:, f], descending=True, stable=True)
        assert col.top.rows[f].tolist() == ref.indices[:5].tolist()
        win = layout.windows(col.top.rows[f], 2, 1)  # [5, 4]
        assert torch.equal(col.top.windows[f], torch.where(win >= 0, dense[win.clamp(min=0), f], 0.0))
        s = col.samples.rows[f]
        assert len(set(s.tolist())) == 4 and bool((dense[s, f] > 0).all())
        assert torch.equal(col.samples.windows[f][:, 2], dense[s, f])  # the sampled token sits at index `left`


def test_errors(capsys):
    with pytest.raises(UserError, match="power of two"):
        DashboardConfig(n_bins=20)
    with pytest.raises(UserError, match=r"DashboardConfig.left \(--left\) must be an integer >= 0"):
        DashboardConfig(left=-1)
    with pytest.raises(UserError, match="'0-99,512'"):
        DashboardConfig(features="x")
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "/nonexistent/run", "--cache", "/nonexistent/cache", "--out", "/tmp/never"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("mcsae: error: ") and "/nonexistent/run" in err and err.count("\n") == 1


# ---- a real site ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "A dashboard of a briefly trained MC SAE (TopK beside it in the text view) over a tiny real cache."
    tmp = tmp_path_factory.mktemp("dash")
    model, tok = tiny_model(n_layer=1, d_model=16)
    acfg = ActivationConfig(model="tiny", corpus="kjv", hook=0, context_length=32, n_tokens=31 * 48)
    cache = open_cache(build_cache(acfg, tmp / "cache", model, tok, eval_fraction=0.25, progress=False))
    short = dict(n_features=32, k=3, n_tokens=128 * 30, batch_size=128, warmup_steps=3, checkpoint_every=0)
    topk_path, mc_path = train([TrainConfig(kind="topk", **short), TrainConfig(kind="mutual_choice", **short)],
                               CacheSource(cache), tmp / "runs", progress=False)
    cfg = DashboardConfig(n_top=6, n_samples=12, n_quantiles=3, per_quantile=2, chunk_tokens=256, n_bins=16)
    index = build_dashboard(SAE.load(mc_path), cache, tmp / "site", model, tok, cfg, compare={"TopK": SAE.load(topk_path)},
                            progress=False)
    return {"index": index, "cache": cache, "mc": mc_path, "tmp": tmp, "cfg": cfg}


def test_site_files_and_overwrite(site):
    root = site["index"].parent
    pages = sorted((root / "features").glob("f*.html"))
    col = collect(SAE.load(site["mc"]), site["cache"], site["cfg"], progress=False)
    assert len(pages) == int((col.count > 0).sum()) > 0
    assert {p.name for p in root.iterdir()} == {"index.html", "adaptive.html", "features", "style.css", "dashboard.js",
                                               "dashboard.json"}
    for p in [root / "index.html", root / "adaptive.html", *pages]:
        text = p.read_text()
        assert "http://" not in text and "https://" not in text  # self-contained
    with pytest.raises(UserError, match="overwrite"):
        build_dashboard(SAE.load(site["mc"]), site["cache"], root, progress=False)
    assert site_files(root) == {p.relative_to(root).as_posix() for p in root.rglob("*")}  # all of it is mcsae's to replace
    assert not list(root.parent.glob(".site.tmp-*"))  # nothing half-written left behind


def test_cli_dashboard(site, capsys):
    out = site["tmp"] / "cli_site"
    main(["dashboard", str(site["mc"].parent), "--cache", str(site["cache"].path), "--out", str(out), "--model", "none",
          "--features", "0-3", "--n-top", "3", "--chunk-tokens", "256"])
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"f{f:05d}.html" for f in range(4)]
    assert str(out / "index.html") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # a model that cannot be loaded: the error names the way out
        main(["dashboard", str(site["mc"].parent), "--cache", str(site["cache"].path), "--out", str(site["tmp"] / "x"),
              "--model", "./no-such-model"])
    assert "--model none" in capsys.readouterr().err
    assert not (site["tmp"] / "x").exists()
    with pytest.raises(SystemExit, match="2"):
        main(["dashboard", str(site["mc"].parent), "--cache", str(site["cache"].path), "--out", str(out), "--model", "none"])
    assert capsys.readouterr().err.startswith(f"mcsae: error: {out} exists")


# ---- in a real browser -----------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    "Headless Chromium through selenium, with the browser console log captured."
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        if os.environ.get("MCSAE_REQUIRE_BROWSER"):
            pytest.fail(f"browser test needs {', '.join(missing)}: run `make browser`")
        pytest.skip(f"no {', '.join(missing)} (`make browser` installs them)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> list[dict]:
    "Load a page; return the console messages of level SEVERE it produced."
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    return [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]


def test_console_errors_are_seen(browser, site):
    "The check below is not vacuous: an error logged by a page does reach it."
    _open(browser, site["index"])
    browser.execute_script("console.error('deliberate')")
    assert any("deliberate" in m["message"] for m in browser.get_log("browser"))


# Each inline SVG chart as the browser lays it out: its box, and its bars' boxes (the site has no <img>: charts are SVG).
_SVGS = """return [...document.querySelectorAll('svg')].map(s => {
  const box = s.getBoundingClientRect();
  const rects = [...s.querySelectorAll('rect')], bars = rects.map(r => r.getBoundingClientRect());
  return {cls: s.getAttribute('class'), w: box.width, h: box.height, bars: bars.length,
          drawn: bars.filter(b => b.width > 0 && b.height > 0).length,
          counted: rects.filter(r => parseInt(r.querySelector('title').textContent) > 0).length,
          agree: rects.every((r, i) => (parseInt(r.querySelector('title').textContent) > 0) === (bars[i].height > 0)),
          inside: bars.every(b => b.left >= box.left - 0.5 && b.right <= box.right + 0.5 && b.top >= box.top - 0.5
                                  && b.bottom <= box.bottom + 0.5)};
});"""


def test_pages_load_cleanly_and_every_link_resolves(browser, site):
    "Every page loads without console errors, with its stylesheet and script; every link and chart is really there."
    root = site["index"].parent.resolve()
    pages = [root / "index.html", root / "adaptive.html", *sorted((root / "features").glob("*.html"))]
    targets, n_charts = set(), 0
    for page in pages:
        errors = _open(browser, page)
        assert not errors, f"{page.name}: {errors}"
        assert browser.execute_script("return document.styleSheets.length") == 1  # style.css loaded
        assert browser.execute_script("return typeof sortTable") == "function"  # dashboard.js loaded and ran
        assert browser.execute_script("return document.images.length") == 0  # nothing drawn as an image: charts are SVG
        urls = browser.execute_script(
            "return [...document.querySelectorAll('a[href]')].map(e => e.href)"
            ".concat([...document.querySelectorAll('link[href]')].map(e => e.href))"
            ".concat([...document.querySelectorAll('script[src]')].map(e => e.src))")
        assert urls, page.name
        for url in urls:
            u = urlparse(url)
            assert u.scheme == "file", f"{page.name} links outside the site: {url}"
            target = Path(unquote(u.path))
            assert target.is_file() and root in target.parents, f"{page.name}: broken link {url}"
            targets.add(target)
        charts = browser.execute_script(_SVGS)
        for c in charts:  # laid out with a size; a bar of a non-zero count drawn with a size, inside its chart
            assert c["w"] > 0 and c["h"] > 0 and c["drawn"] == c["counted"] > 0 and c["agree"] and c["inside"], (page.name, c)
        n_charts += len(charts)
        if page.parent.name == "features":
            f = int(page.stem[1:])
            fired = "never fired" not in page.read_text()
            assert len([c for c in charts if c["cls"] == "hist"]) == int(fired), page.name  # one histogram if it fired
            if fired:
                assert browser.execute_script("return document.querySelectorAll('.ctx span.at').length") > 0, f
        if page.name == "adaptive.html":
            assert len(charts) == 1 and browser.execute_script("return document.querySelectorAll('.l0 span').length") > 0
    assert n_charts >= len(pages) - 1
    for target in sorted(targets - set(pages)):  # what the links reach that is not a page checked above: loads cleanly
        assert target.suffix in (".css", ".js"), target
    for target in sorted(t for t in targets if t.suffix == ".html"):  # every linked page loads in the browser
        assert not _open(browser, target), target
        assert browser.execute_script("return document.title"), target


def test_sorting_and_search(browser, site):
    from selenium.webdriver.common.by import By

    assert not _open(browser, site["index"])
    column = "return [...document.querySelectorAll('#features tbody tr')].filter(r => !r.hidden)" \
             ".map(r => parseFloat(r.cells[%d].dataset.v))"
    headers = browser.find_elements(By.CSS_SELECTOR, "#features th")
    density = headers[1]
    density.click()
    up = browser.execute_script(column % 1)
    assert up == sorted(up) and density.get_attribute("aria-sort") == "ascending"
    density.click()
    down = browser.execute_script(column % 1)
    assert down == sorted(down, reverse=True) and len(set(down)) > 1 and density.get_attribute("aria-sort") == "descending"
    headers[0].click()
    assert browser.execute_script(column % 0) == sorted(browser.execute_script(column % 0))

    search = browser.find_element(By.ID, "search")
    n_all = len(browser.execute_script(column % 0))
    search.send_keys("#7")  # exact feature number
    assert browser.execute_script(column % 0) == [7.0]
    assert browser.find_element(By.ID, "count").text == "1"
    search.clear()
    search.send_keys("1")  # substring: every feature with a 1 in its number or its tokens
    shown = browser.execute_script("return [...document.querySelectorAll('#features tbody tr')].filter(r => !r.hidden)"
                                   ".map(r => [r.dataset.f, [r.cells[0], ...r.querySelectorAll('td.l')].map(c => c.textContent).join(' ')])")
    assert all("1" in text for _, text in shown) and {"1", "10", "21"} <= {f for f, _ in shown} and len(shown) < n_all
    search.clear()
    search.send_keys("no token is called this")
    assert browser.execute_script(column % 0) == [] and browser.find_element(By.ID, "count").text == "0"
    search.clear()
    browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
    assert len(browser.execute_script(column % 0)) == n_all
