"""The reports as a person sees them: headless Chromium at a phone's and a desktop's width."""

import pytest

pytestmark = pytest.mark.browser

VIEWPORTS = {"phone": (375, 812), "desktop": (1366, 900)}
# what a person would notice: broken or overflowing pictures, a page wider than the screen
_LAYOUT = """
        const images = [...document.images];
        return {title: document.title, width: document.documentElement.scrollWidth,
                viewport: window.innerWidth, images: images.length,
                broken: images.filter(i => !i.complete || i.naturalWidth === 0).length,
                wider: images.filter(i => i.getBoundingClientRect().right > window.innerWidth + 1).length,
                headings: [...document.querySelectorAll('h2')].map(h => h.textContent.trim())};"""


def _open(browser, page, viewport):
    browser.set_window_size(*VIEWPORTS[viewport])
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(page.as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_run_report_renders_without_errors_at_phone_and_desktop_width(browser, tiny_head_run, viewport):
    _open(browser, tiny_head_run.dir / "report.html", viewport)
    state = browser.execute_script(_LAYOUT)
    assert "head" in state["title"]
    assert state["images"] >= 5 and state["broken"] == 0
    assert state["width"] <= state["viewport"], "the page must not scroll sideways"
    assert state["wider"] == 0, "no picture wider than the screen"
    assert {"Data", "Learning curves", "Test results", "Model"} <= set(state["headings"])


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_comparison_report_renders_at_phone_and_desktop_width(browser, tiny_comparison, viewport):
    _open(browser, tiny_comparison.dir / "report.html", viewport)
    state = browser.execute_script(_LAYOUT)
    assert state["images"] >= 3 and state["broken"] == 0
    assert state["width"] <= state["viewport"] and state["wider"] == 0
    assert {"Strategies side by side", "Accuracy and cost", "Runs", "Data"} <= set(state["headings"])



@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_saliency_maps_render_beside_the_wrong_thumbnails(browser, tiny_head_run, viewport):
    _open(browser, tiny_head_run.dir / "report.html", viewport)
    pairs = browser.execute_script("""
        return [...document.querySelectorAll('#wrong ~ .thumbs .thumb')].map(thumb => {
            const [image, map] = thumb.querySelectorAll('img');
            const a = image.getBoundingClientRect(), b = map ? map.getBoundingClientRect() : null;
            return {loaded: !!map && map.complete && map.naturalWidth > 0 && image.naturalWidth > 0,
                    beside: !!b && Math.abs(a.top - b.top) < 1 && b.left >= a.right,
                    width: b ? b.width : 0};
        });""")
    assert pairs, "a random tiny model gets some test images wrong"
    assert all(p["loaded"] and p["beside"] and p["width"] >= 60 for p in pairs), pairs
