"""`cbr serve` in a real browser: headless Chromium driven by selenium, against uvicorn on loopback.

Needs Debian's ``chromium`` and ``chromium-driver``. Without them the tests skip, unless
CBR_REQUIRE_BROWSER=1 (set by .ci/run), which turns the skip into a failure.
"""

import contextlib
import csv
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from cbr.store.casebase import open_casebase

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--no-first-run", "--window-size=1400,1100")


def _find_browser():
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary and driver:
        return binary, driver
    reason = ("no headless browser: install Debian's chromium and chromium-driver "
              "(apt-get install -y chromium chromium-driver) to run the browser tests")
    if os.environ.get("CBR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CBR_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def server(indexed, tmp_path):
    """uvicorn serving a fresh app over the tiny case base, on a free loopback port, in a thread."""
    with _serving(indexed, tmp_path / "serve") as url:
        yield url


@pytest.fixture
def localised_server(localised_template, tmp_path):
    """The same over a copy of the case base whose model carries a lesion localiser; its calibrated
    on-finding floor is set above every share, so the page warns that the answer rests elsewhere."""
    from cbr.store.reliability import Reliability, store_reliability

    shutil.copytree(localised_template.db.parent, tmp_path / "w")
    cb = open_casebase(tmp_path / "w" / "cases.db", create=False)
    store_reliability(cb, 1, Reliability(0.9, 10, "layercam", "", "finding", "evaluate", centre=0.2,
                                         on_finding_floor=1.01))
    cb.close()
    with _serving(tmp_path / "w" / "cases.db", tmp_path / "serve") as url:
        yield url


@contextlib.contextmanager
def _serving(db, data_dir):
    import uvicorn

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings

    cb = open_casebase(db, create=False)
    app = create_app(cb, ServeSettings(data_dir=data_dir, k=3))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert srv.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()
        cb.close()


@pytest.fixture
def browser(tmp_path):
    binary, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _open_report(driver, url):
    """A query's report (a large self-contained page). As for the home page (``_open_home``), a busy
    machine's Chromium can return from ``get`` with a blank document: it is waited for, and asked
    for once more if it stays blank."""
    from selenium.common.exceptions import TimeoutException

    driver.get(url)
    try:
        _wait(driver, lambda d: d.page_source, timeout=20)
    except TimeoutException:
        driver.get(url)
        _wait(driver, lambda d: d.page_source, timeout=60)


def _open_home(driver, server):
    """The home page, once its upload form is there. A busy machine's Chromium has been seen to
    return from ``get`` with a blank document (page_source ''); the form is waited for, and the
    page asked for once more if it stays blank."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    driver.get(server + "/")
    try:
        _wait(driver, lambda d: d.find_elements(By.ID, "image-input"), timeout=20)
    except TimeoutException:
        driver.get(server + "/")
        _wait(driver, lambda d: d.find_elements(By.ID, "image-input"), timeout=60)


def _overlays_loaded(driver):
    """Every visible overlay image has finished loading with real pixels."""
    return driver.execute_script("""
        const imgs = [...document.querySelectorAll('img.overlay')].filter(i => !i.classList.contains('none'));
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);""")


def _query_method(cb, qid):
    from cbr.store.schema import Query

    with cb.read() as s:
        return s.get(Query, qid).explain_method or ""


def _image(query_set):
    with open(query_set, newline="") as fh:
        return query_set.parent / next(csv.DictReader(fh))["path"]


@pytest.mark.slow
def test_upload_compare_slide_correct_and_find_it_in_history(browser, server, query_set, tmp_path, indexed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open_home(browser, server)
    assert "Ask the case base" in browser.page_source
    browser.find_element(By.ID, "image-input").send_keys(str(_image(query_set)))
    browser.find_element(By.ID, "upload-submit").click()
    _wait(browser, lambda d: "/queries/" in d.current_url and d.find_elements(By.ID, "diagnosis"))
    query_url = browser.current_url
    qid = int(query_url.rstrip("/").rsplit("/", 1)[1])

    # The query beside its neighbours, each with its map drawn over it.
    assert len(browser.find_elements(By.CSS_SELECTOR, ".tile.neighbour")) == 3
    _wait(browser, _overlays_loaded, timeout=60)
    overlay = browser.find_element(By.ID, f"overlay-q-{1}")
    assert "/maps/similarity.png" in overlay.get_attribute("src")
    bases = browser.find_elements(By.CSS_SELECTOR, "img.base")
    assert len(bases) == 4 and all(b.get_attribute("naturalWidth") == "320" for b in bases)

    # Move an opacity slider with the keyboard: the overlay's opacity follows.
    before = float(browser.execute_script("return getComputedStyle(arguments[0]).opacity", overlay))
    slider = browser.find_element(By.CSS_SELECTOR, 'input.opacity[data-target="overlay-q-1"]')
    slider.click()
    for _ in range(30):
        slider.send_keys(Keys.ARROW_LEFT)
    after = float(browser.execute_script("return getComputedStyle(arguments[0]).opacity", overlay))
    assert before == pytest.approx(0.6) and after < before - 0.2
    assert after == pytest.approx(int(slider.get_attribute("value")) / 100, abs=0.011)

    # Switch to the class maps: tinycnn without weights has no class head, so there is no class map of
    # the query and the cases' stored maps are embedding maps: none is shown as a class map, the page
    # says why, and the similarity rings are not drawn over the class maps.
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-kind"][value="class"]').click()
    neighbour_overlay = browser.find_element(By.CSS_SELECTOR, ".tile.neighbour img.overlay")
    assert "none" in neighbour_overlay.get_attribute("class") and "none" in overlay.get_attribute("class")
    assert "no class head" in browser.find_element(By.ID, "map-message").text
    assert not any(m.is_displayed() for m in browser.find_elements(By.CSS_SELECTOR, "svg.markers.ring"))
    # the cases' stored findings (the phantoms' masks) are facts about the cases: outlined in every mode
    assert all(m.is_displayed() for m in browser.find_elements(By.CSS_SELECTOR, "svg.markers.region"))
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-kind"][value="similarity"]').click()
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-scale"][value="per-image"]').click()
    assert "scale=per-image" in neighbour_overlay.get_attribute("src")
    _wait(browser, _overlays_loaded, timeout=60)
    browser.save_screenshot(str(tmp_path / "query-page.png"))
    assert (tmp_path / "query-page.png").stat().st_size > 10_000

    # Add maps by another method (as `cbr explain` does), then switch the page to them.
    from cbr.pipeline.addendum import add_explanation

    cb = open_casebase(indexed, create=False)
    try:
        used = add_explanation(cb, qid, "gradcam" if "eigencam" in _query_method(cb, qid) else "eigencam")
    finally:
        cb.close()
    browser.get(query_url)
    _wait(browser, _overlays_loaded, timeout=60)
    method_select = Select(browser.find_element(By.ID, "map-method"))
    assert [o.text for o in method_select.options][1] == f"{used.method} (added later)"
    overlay = browser.find_element(By.ID, "overlay-q-1")
    neighbour_overlay = browser.find_element(By.CSS_SELECTOR, ".tile.neighbour img.overlay")
    before_src = (overlay.get_attribute("src"), neighbour_overlay.get_attribute("src"))
    method_select.select_by_index(1)
    after_src = (overlay.get_attribute("src"), neighbour_overlay.get_attribute("src"))
    assert all(a != b and "method=" + used.method in a for a, b in zip(after_src, before_src))
    _wait(browser, _overlays_loaded, timeout=60)

    # Correct the diagnosis with another label and a note.
    predicted = browser.find_element(By.ID, "diagnosis").text
    select = Select(browser.find_element(By.ID, "feedback-label"))
    other = next(o.get_attribute("value") for o in select.options if o.get_attribute("value") != predicted)
    select.select_by_value(other)
    browser.find_element(By.ID, "feedback-note").send_keys("looks like the other class to me")
    browser.find_element(By.ID, "feedback-by").send_keys("dr.browser")
    browser.find_element(By.ID, "feedback-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "feedback-table"))
    assert "looks like the other class to me" in browser.find_element(By.ID, "feedback-table").text

    # It is in the history, and in the "disagreed" filter.
    browser.get(server + "/history?disagreed=1")
    table = browser.find_element(By.ID, "history-table").text
    assert f"corrected -> {other}" in table and "looks like the other class to me" in table
    assert browser.find_element(By.LINK_TEXT, str(qid))


@pytest.mark.slow
def test_draw_a_region_and_query_it(browser, server, query_set):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _open_home(browser, server)
    browser.find_element(By.ID, "image-input").send_keys(str(_image(query_set)))
    browser.find_element(By.ID, "upload-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "region-stack"))
    parent = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
    stack = browser.find_element(By.ID, "region-stack")
    button = browser.find_element(By.ID, "refine-region")
    assert not button.is_enabled()
    ActionChains(browser).move_to_element_with_offset(stack, -100, -100).click_and_hold() \
        .move_by_offset(120, 150).release().perform()
    assert button.is_enabled()
    assert browser.find_element(By.ID, "region-box").is_displayed()
    button.click()
    _wait(browser, lambda d: d.find_elements(By.ID, "refines"))
    assert f"query {parent}" in browser.find_element(By.ID, "refines").text


AXE = Path(__file__).parent / "assets" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Where the walk-through's screenshots go: $CBR_ARTIFACTS, else a folder under pytest's basetemp."""
    folder = Path(os.environ.get("CBR_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {folder}")
    return folder


def _shot(driver, folder, name):
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000, f"{name} is blank"


def _serious_violations(driver) -> list[str]:
    """axe-core's serious and critical accessibility violations of the page shown."""
    driver.execute_script(AXE.read_text(encoding="utf-8"))
    result = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));""")
    assert isinstance(result, list), result
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[(n['target'], n['failureSummary'][-160:]) for n in v['nodes']][:4]}"
            for v in result if v["impact"] in ("serious", "critical")]


def _compare_ready(driver):
    return driver.execute_script("""
        const c = document.getElementById('pane-neighbour');
        if (!c || !window.cbrCompare) return false;
        const px = c.getContext('2d').getImageData(Math.floor(c.width / 2), Math.floor(c.height / 2), 1, 1).data;
        return document.getElementById('zoom-text').textContent.includes('px image') && px[3] === 255;""")


def _centre_pixel(driver, pane):
    return driver.execute_script(f"""
        const c = document.getElementById('{pane}');
        return Array.from(c.getContext('2d').getImageData(Math.floor(c.width / 2), Math.floor(c.height / 2), 1, 1).data);""")


def _walk_compare(browser, artifacts, query_url):
    """The compare view: open it from a neighbour, zoom, change the window, step to the next neighbour."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.find_element(By.CSS_SELECTOR, ".tile.neighbour a.compare-link").click()
    _wait(browser, lambda d: "/compare/" in d.current_url and _compare_ready(d), timeout=60)
    first = browser.current_url
    pane = browser.find_element(By.ID, "pane-query")
    assert pane.size["width"] > 500, "the compare view should use the window's width"
    _shot(browser, artifacts, "02-compare.png")
    for _ in range(3):
        browser.find_element(By.ID, "zoom-in").click()
    assert browser.execute_script("return window.cbrCompare.zoom") == pytest.approx(1.25 ** 3)
    ActionChains(browser).move_to_element(pane).click_and_hold().move_by_offset(60, 40).release().perform()
    assert browser.execute_script("return window.cbrCompare.cx") < 0.5  # dragged right: the view moved left
    _shot(browser, artifacts, "03-compare-zoomed.png")
    before = _centre_pixel(browser, "pane-query")
    Select(browser.find_element(By.ID, "wl-preset")).select_by_visible_text("dark parts")
    assert browser.find_element(By.ID, "wl-text").text == "L 64 W 128"
    ActionChains(browser).move_to_element(pane).key_down(Keys.SHIFT).click_and_hold().move_by_offset(30, -20) \
        .release().key_up(Keys.SHIFT).perform()
    assert browser.find_element(By.ID, "wl-text").text == "L 84 W 188"
    slider = browser.find_element(By.ID, "map-opacity")
    slider.click()
    for _ in range(60):
        slider.send_keys(Keys.ARROW_LEFT)
    assert browser.execute_script("return window.cbrCompare.opacity") == 0
    assert _centre_pixel(browser, "pane-query") != before
    _shot(browser, artifacts, "04-compare-window.png")
    browser.find_element(By.TAG_NAME, "h1").click()
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    _wait(browser, lambda d: d.current_url != first and _compare_ready(d), timeout=60)
    assert "/compare/" in browser.current_url
    _shot(browser, artifacts, "05-compare-next.png")
    problems = _serious_violations(browser)
    browser.get(query_url)
    return problems


def _scroll_to(browser, element_id):
    """Bring an element to the top of the window, so a screenshot shows what follows it."""
    browser.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'start'}); window.scrollBy(0, -50)",
                           element_id)


def _draw_box(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    stack = browser.find_element(By.ID, "region-stack")
    ActionChains(browser).move_to_element_with_offset(stack, -100, -100).click_and_hold() \
        .move_by_offset(120, 150).release().perform()


@pytest.mark.slow
def test_audit_walk_through_with_screenshots(browser, server, query_set, artifacts, indexed):
    """Upload, compare, zoom, window, refine by region, a verdict with a drawn lesion box seen again
    on reload, a retain refused with its message, and axe-core on every page; one screenshot a step."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(1600, 1100)
    _open_home(browser, server)
    problems = {"home": _serious_violations(browser)}
    browser.find_element(By.ID, "image-input").send_keys(str(_image(query_set)))
    browser.find_element(By.ID, "upload-submit").click()
    _wait(browser, lambda d: "/queries/" in d.current_url and d.find_elements(By.ID, "diagnosis"))
    query_url = browser.current_url
    _wait(browser, _overlays_loaded, timeout=60)
    _shot(browser, artifacts, "01-query-page.png")
    problems["query"] = _serious_violations(browser)
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-kind"][value="class"]').click()
    assert browser.find_element(By.ID, "map-message").is_displayed()
    _shot(browser, artifacts, "01b-no-class-map.png")
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-kind"][value="similarity"]').click()
    problems["compare"] = _walk_compare(browser, artifacts, query_url)

    # Refine by region: the box is searched among the cases' findings (the phantoms' masks); the result
    # outlines the region searched on the query and, on each neighbour, its own finding nearest to it.
    _draw_box(browser)
    _scroll_to(browser, "region-stack")
    _shot(browser, artifacts, "06a-region-drawn.png")
    browser.find_element(By.ID, "refine-region").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "refines"))
    outlines = browser.find_elements(By.CSS_SELECTOR, "svg.markers.region")
    assert [o.get_attribute("data-source") for o in outlines] == ["drawn"] + ["finding"] * 3
    assert all(o.is_displayed() for o in outlines)
    assert "out of distribution" not in browser.find_element(By.ID, "diagnosis").text
    _scroll_to(browser, "region-stack")
    _shot(browser, artifacts, "06-refined-region.png")
    refined_url = browser.current_url
    browser.find_element(By.CSS_SELECTOR, ".tile.neighbour a.compare-link").click()
    _wait(browser, lambda d: "/compare/" in d.current_url and _compare_ready(d), timeout=60)
    root = browser.find_element(By.ID, "compare")
    assert root.get_attribute("data-region-query") and root.get_attribute("data-region-case")
    _shot(browser, artifacts, "06b-refined-compare.png")
    _open_report(browser, refined_url.replace("/queries/", "/api/queries/") + "/report")
    assert "Search by finding: the region" in browser.page_source
    browser.execute_script("document.querySelector('h2').scrollIntoView({block: 'start'})")
    _shot(browser, artifacts, "06c-refined-report.png")

    # A verdict with the same drawn box as the lesion, by a reviewer the browser remembers.
    browser.get(query_url)
    _draw_box(browser)
    browser.find_element(By.ID, "feedback-use-box").click()
    browser.find_element(By.ID, "feedback-by").send_keys("dr.walk")
    browser.find_element(By.ID, "feedback-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "feedback-messages"))
    said = browser.find_element(By.ID, "feedback-messages").text
    assert "confirmed" in said and "kept with the verdict" in said
    _shot(browser, artifacts, "07-verdict-with-lesion.png")
    browser.get(query_url)
    assert browser.find_element(By.ID, "lesion-mark").is_displayed()
    assert "Lesion box of the latest verdict" in browser.find_element(By.ID, "lesion-text").text
    assert browser.find_element(By.ID, "feedback-by").get_attribute("value") == "dr.walk"
    _shot(browser, artifacts, "08-reload-lesion.png")

    # Retain a case's own image: refused (already a case, or another label), and the page says why.
    _open_home(browser, server)
    browser.find_element(By.ID, "case-id-input").send_keys("1")
    browser.find_element(By.ID, "case-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "feedback-form"))
    browser.find_element(By.CSS_SELECTOR, 'input[name="retain"]').click()
    browser.find_element(By.ID, "feedback-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "feedback-messages"))
    said = browser.find_element(By.ID, "feedback-messages").text
    assert "case 1" in said and ("not added twice" in said or "label conflict" in said), said
    _shot(browser, artifacts, "09-retain-refused.png")

    _open_report(browser, query_url.replace("/queries/", "/api/queries/") + "/report")
    assert browser.find_elements(By.CSS_SELECTOR, "img.cbar-img")
    _shot(browser, artifacts, "12-static-report.png")
    browser.get(server + "/history")
    _shot(browser, artifacts, "10-history.png")
    problems["history"] = _serious_violations(browser)
    browser.get(server + "/queries/987654")
    text = browser.find_element(By.TAG_NAME, "main").text
    assert "987654" in text and str(indexed) not in text and "cbr " not in text
    _shot(browser, artifacts, "11-not-found.png")
    assert not any(problems.values()), "\n".join(f"{page}: {v}" for page, vs in problems.items() for v in vs)


@pytest.mark.slow
def test_the_finding_map_its_regions_and_the_contrast_in_the_browser(browser, localised_server, query_set, artifacts):
    """A model with a lesion localiser: its map is the default, each image's localised region is
    outlined (and hidden with the other maps), the page warns that the answer rests off the finding
    and names the nearest unlike case; axe-core on the query and compare pages."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(1600, 1100)
    _open_home(browser, localised_server)
    browser.find_element(By.ID, "image-input").send_keys(str(_image(query_set)))
    browser.find_element(By.ID, "upload-submit").click()
    _wait(browser, lambda d: "/queries/" in d.current_url and d.find_elements(By.ID, "diagnosis"))
    _wait(browser, _overlays_loaded, timeout=60)
    assert browser.find_element(By.ID, "map-kind-finding").is_selected()
    assert "/maps/finding.png" in browser.find_element(By.ID, "overlay-q-1").get_attribute("src")
    assert not browser.find_element(By.ID, "map-message").is_displayed()  # every image has its finding map
    outlines = browser.find_elements(By.CSS_SELECTOR, "svg.markers.region")
    sources = [o.get_attribute("data-source") for o in outlines]
    # the query's localised region; each neighbour's stored finding (a phantom's mask), else its localised one
    assert sources[0] == "localiser" and len(sources) == 4 and set(sources[1:]) <= {"stored", "localiser"}
    assert all(o.is_displayed() for o in outlines)
    assert "outside the finding" in browser.find_element(By.ID, "finding-warning").text
    assert "nearest case of another label" in browser.find_element(By.ID, "nearest-unlike").text
    _shot(browser, artifacts, "13-finding-map.png")
    problems = {"query (finding map)": _serious_violations(browser)}
    browser.find_element(By.CSS_SELECTOR, 'input[name="map-kind"][value="similarity"]').click()
    # the localiser's boxes belong to its map; stored findings stay
    assert [o.is_displayed() for o in outlines] == [s == "stored" for s in sources]
    browser.find_element(By.CSS_SELECTOR, ".tile.neighbour a.compare-link").click()
    _wait(browser, lambda d: "/compare/" in d.current_url and _compare_ready(d), timeout=60)
    assert browser.execute_script("return window.cbrCompare.map") == "finding"
    _shot(browser, artifacts, "14-finding-compare.png")
    problems["compare (finding map)"] = _serious_violations(browser)
    browser.find_element(By.LINK_TEXT, "all neighbours").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "diagnosis"))
    _open_report(browser, browser.current_url.replace("/queries/", "/api/queries/") + "/report")
    assert "outside the finding" in browser.page_source and "where is the finding" in browser.page_source
    _shot(browser, artifacts, "15-finding-report.png")
    assert not any(problems.values()), "\n".join(f"{page}: {v}" for page, vs in problems.items() for v in vs)
