"""The app in a real browser: Debian's Chromium driven by Playwright. Screenshots are kept in
artifacts/screenshots/ (or $CIFARKIT_ARTIFACTS) for people to look at."""
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, free_port

CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
            or "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def shots() -> Path:
    d = Path(os.environ.get("CIFARKIT_ARTIFACTS", ROOT / "artifacts")) / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(reported_run):
    from playwright.sync_api import sync_playwright

    from cifarkit.serve.app import launch
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: `make test` installs it (apt-get install -y chromium)"
    port = free_port()
    demo = launch(reported_run, port=port, prevent_thread_lock=True, quiet=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        yield pg
        browser.close()
    demo.close()


def test_upload_classify_shows_top_k_and_the_overlay(page, reported_run, shots):
    from cifarkit import load
    examples = sorted((reported_run / "examples").glob("*.png"))
    known = ~load(reported_run).assess(examples).unknown      # a test image the run takes for one of its classes
    example = examples[int(known.nonzero()[0, 0])]
    page.locator("#input-image input[type=file]").set_input_files(str(example))
    page.click("#classify")
    page.wait_for_selector("#overlay img", timeout=60_000)
    text = page.locator("#prediction").inner_text()
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert sum(c in text for c in classes) == 3          # the default top-3, not all ten
    assert page.locator("#overlay img").get_attribute("src")
    page.screenshot(path=str(shots / "classify.png"), full_page=True)


def test_a_prediction_set_is_shown_when_asked_for(page, reported_run, shots):
    example = sorted((reported_run / "examples").glob("*.png"))[2]
    page.get_by_role("tab", name="Classify").click()
    page.locator("#input-image input[type=file]").set_input_files(str(example))
    page.get_by_label("90%").check()
    page.click("#classify")
    page.get_by_text("prediction set at 90%:", exact=False).first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "prediction-set.png"), full_page=True)
    page.get_by_label("off").check()


def test_bad_upload_shows_a_message_not_a_trace(page, tmp_path, shots):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    page.get_by_role("tab", name="Classify").click()
    page.locator("#input-image input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(500)
    page.click("#classify")
    toast = page.get_by_text("cannot read image", exact=False).first
    toast.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()
    page.screenshot(path=str(shots / "bad-upload.png"), full_page=True)


@pytest.mark.parametrize("tab,button,gallery", [("Mistakes", "#show-mistakes", "#mistakes"),
                                                 ("Grad-CAM gallery", "#show-gradcam", "#gradcam-gallery")])
def test_gallery_tabs_fill_with_images(page, shots, tab, button, gallery):
    page.get_by_role("tab", name=tab).click()
    page.click(button)
    page.wait_for_selector(f"{gallery} img", timeout=60_000)
    assert page.locator(f"{gallery} img").count() >= 4
    page.screenshot(path=str(shots / f"{tab.lower().replace(' ', '-')}.png"), full_page=True)


def test_run_tab_shows_accuracy_and_figures(page, shots):
    page.get_by_role("tab", name="Run").click()
    page.get_by_text("Test accuracy", exact=False).first.wait_for(timeout=10_000)
    assert page.locator("img").count() >= 2
    page.screenshot(path=str(shots / "run.png"), full_page=True)


def test_an_upload_over_the_size_limit_is_one_line_in_the_page_and_never_sent(page, tmp_path, shots):
    big = tmp_path / "big-photo.png"
    big.write_bytes(b"\x89PNG" + bytes(21 * 2**20))                    # over the 20 MB default
    sent = []

    def note(request):
        if request.method == "POST" and "/upload" in request.url:
            sent.append(request.url)
    page.on("request", note)
    page.get_by_role("tab", name="Classify").click()
    page.locator("#input-image input[type=file]").set_input_files(str(big))
    toast = page.get_by_text("exceed the maximum allowed size of 20.0 Mb", exact=False).first
    toast.wait_for(timeout=30_000)
    assert '"big-photo.png"' in toast.inner_text() and str(tmp_path) not in page.content()
    page.screenshot(path=str(shots / "upload-too-large.png"), full_page=True)
    page.remove_listener("request", note)
    assert not sent                                                     # refused before a byte was sent


def test_a_blank_page_is_answered_none_of_these_in_the_browser(page, reported_run, tmp_path, shots):
    """A blank page uploaded in the browser gets "not one of the 10 classes (looks least unlike: X)",
    not a class. The run's threshold is set just under that page's score (this barely trained run's
    detector is measured nowhere; the detectors of real runs are measured in BENCHMARKS.md)."""
    import shutil

    from PIL import Image

    from cifarkit import load
    from cifarkit.rundir import RunDir
    from cifarkit.serve.app import launch
    from cifarkit.weights import update_metadata
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 300), "white").save(blank)
    model = load(run)
    update_metadata(RunDir.open(run).weights_file, ood_threshold=repr(float(model.assess([blank]).ood_score[0]) - 1e-3))
    top = model.classes[int(model.probabilities([blank])[0].argmax())]
    port = free_port()
    demo = launch(run, port=port, prevent_thread_lock=True, quiet=True)
    other = page.context.browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        other.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        other.locator("#input-image input[type=file]").set_input_files(str(blank))
        other.click("#classify")
        answer = other.get_by_text(f"not one of the {len(model.classes)} classes", exact=False).first
        answer.wait_for(timeout=60_000)
        other.wait_for_selector("#overlay img", timeout=60_000)
        assert f"(looks least unlike: {top})" in other.locator("#prediction").inner_text()
        assert not any(f"{c}\n" in other.locator("#prediction").inner_text() for c in model.classes if c != top)
        other.screenshot(path=str(shots / "none-of-these.png"), full_page=True)
    finally:
        other.close()
        demo.close()
