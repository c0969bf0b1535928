"""The explorer built from the nano tables: every behavior has a page whose core content is in the
HTML, and in a real headless Chromium (Debian's, driven by selenium) the pages load without a
console error, the filters change what is shown, and a screenshot of a behavior page is written.

The browser tests skip where Chromium or its driver is missing, unless
``PYTHIA_ATTRIBUTION_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them) makes that a
failure."""

from __future__ import annotations

import os
import shutil

import pytest

from pythia_attribution import paths, tables
from pythia_attribution.explorer import SHOWN, build, slug, slugs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(nano_run, tmp_path_factory):
    return build(nano_run["results"], tmp_path_factory.mktemp("explorer") / "explorer")


def _final_attributions(results):
    att = tables.read_table(paths.table_path(results / paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)).to_pandas()
    return att[att["checkpoint"] == att["checkpoint"].max()]


def test_every_behavior_has_a_page_readable_without_javascript(nano_run, site):
    att = _final_attributions(nano_run["results"])
    pages = {p.name for p in (site / "behavior").iterdir()}
    page_of = slugs(att["behavior_id"].unique())
    assert pages == set(page_of.values()) and len(pages) == att["behavior_id"].nunique()
    index = (site / "index.html").read_text()
    assert all(f'href="behavior/{page_of[b]}"' in index for b in att["behavior_id"].unique())
    assert "https://" not in index and "http://" not in index  # offline: nothing fetched
    assert "The step: one AdamW step from step" in index and "with the saved moments" in index
    for b, g in att.groupby("behavior_id"):
        page = (site / "behavior" / page_of[b]).read_text()
        assert "http://" not in page and "https://" not in page
        for m, rows in g.groupby("method"):
            assert f'data-method="{m}"' in page
            shown = min(len(rows), SHOWN)
            assert page.count(f'<section class="column" data-method="{m}">') == 1
            assert all(f"<b>#{r}</b>" in page for r in range(1, shown + 1))
        # the tokenwise split of the top sequences is shaded, token by token
        assert 'title="+' in page or 'title="-' in page


def test_a_failed_build_keeps_the_previous_site(nano_run, site, monkeypatch):
    from pythia_attribution import explorer

    before = (site / "index.html").read_text()
    monkeypatch.setattr(explorer, "_tracing_section", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build(nano_run["results"], site)
    assert (site / "index.html").read_text() == before


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("PYTHIA_ATTRIBUTION_REQUIRE_BROWSER") == "1":
            pytest.fail("PYTHIA_ATTRIBUTION_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _visible(driver, selector: str) -> int:
    from selenium.webdriver.common.by import By

    return sum(1 for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed())


def test_the_index_loads_and_its_family_filter_works(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((site / "index.html").as_uri())
    assert _errors(browser) == []
    rows = "tr[data-family]"
    everything = _visible(browser, rows)
    families = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "family")).options][1:]
    counts = {}
    for family in families:
        Select(browser.find_element(By.ID, "family")).select_by_value(family)
        counts[family] = _visible(browser, rows)
        assert browser.find_element(By.ID, "shown").text == str(counts[family])
    assert sum(counts.values()) == everything
    assert all(0 < n < everything for n in counts.values())
    assert _errors(browser) == []


def test_a_behavior_page_filters_methods_and_categories(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = sorted((site / "behavior").iterdir())[0]
    browser.get(page.as_uri())
    assert _errors(browser) == []
    cards = _visible(browser, ".card")
    assert cards > 0
    box = browser.find_element(By.CSS_SELECTOR, 'input[data-filter="method"][value="random"]')
    box.click()
    assert not browser.find_element(By.CSS_SELECTOR, 'section[data-method="random"]').is_displayed()
    without_random = _visible(browser, ".card")
    assert 0 < without_random < cards
    box.click()
    assert _visible(browser, ".card") == cards
    categories = {e.get_attribute("data-category") for e in browser.find_elements(By.CSS_SELECTOR, ".card")}
    category = sorted(categories)[0]
    browser.find_element(By.CSS_SELECTOR, f'input[data-filter="category"][value="{category}"]').click()
    assert _visible(browser, ".card") < cards
    assert _visible(browser, f'.card[data-category="{category}"]') == 0
    shot = tmp_path / "behavior.png"
    browser.find_element(By.CSS_SELECTOR, f'input[data-filter="category"][value="{category}"]').click()
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert _errors(browser) == []


def test_page_names_never_collide():
    ids = ["style/came-to-pass", "style_came-to-pass", "日本", "中国", "factual/capital-Japan"]
    names = slugs(ids)
    assert len(set(names.values())) == len(ids)
    assert all(n.endswith(".html") and len(n) > len(".html") and "/" not in n for n in names.values())
    # ids whose plain slug is unique keep it, so pages stay where they were
    assert names["factual/capital-Japan"] == slug("factual/capital-Japan") == "factual_capital-Japan.html"
    assert names["style/came-to-pass"] != slug("style/came-to-pass")
    assert slugs(reversed(ids)) == names


def _identity(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_a_site_made_from_the_same_tables_is_not_built_again(nano_run, tmp_path):
    """`nox -s paper` builds the explorer each time; made from the same tables and code and still
    whole, it is left alone, and a page that no longer matches what was written is rebuilt."""
    from pythia_attribution.explorer import build_if_stale

    out = build_if_stale(nano_run["results"], tmp_path / "explorer")
    index = out / "index.html"
    page = sorted((out / "behavior").iterdir())[0]
    first = _identity(index)
    build_if_stale(nano_run["results"], out)
    assert _identity(index) == first
    page.write_text("edited by hand")
    build_if_stale(nano_run["results"], out)
    assert page.read_text() != "edited by hand" and _identity(index) != first
    second = _identity(index)
    build_if_stale(nano_run["results"], out, force=True)
    assert _identity(index) != second
