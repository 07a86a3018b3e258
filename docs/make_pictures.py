"""The README's and the manual's pictures, made from a trained run, never by hand.

    python docs/make_pictures.py RUN_DIR        # `make pictures RUN=RUN_DIR`

RUN_DIR is a finished run with its report (a `--preset quick` run is what the README shows).
Writes docs/images/report.png (the top of the report page), docs/images/app.png (the app
classifying one of the run's example images) and docs/images/budget_curve_cpu.png (the benchmark
figure from bench/figures, as BENCHMARKS.md shows it). Drives Debian's Chromium through Playwright
(`make browser` installs it); set CHROMIUM to use another binary.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
CURVE = ROOT / "bench" / "figures" / "budget_curve_cpu.png"
VIEWPORT = {"width": 1280, "height": 900}  # css px; pictures are taken at device scale 1
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("make_pictures: Chromium not found: run `make browser` (Debian: apt-get install -y chromium)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_picture(browser, run_dir: Path, out: Path) -> None:
    """The report page at half size from its first figures (curves, learning rate, confusion matrix,
    mistakes): the tables above them are text, the figures are what a reader recognizes."""
    from cifarkit.rundir import RunDir
    page_file = RunDir.open(run_dir).report_dir / RunDir.REPORT_PAGE
    if not page_file.is_file():
        sys.exit(f"make_pictures: {page_file} not found: write it with `cifarkit report {run_dir}`")
    page = browser.new_page(viewport={"width": 640, "height": 900})  # the zoomed page's width
    page.goto(page_file.resolve().as_uri(), wait_until="load")
    page.evaluate("document.body.style.zoom = '0.5'")
    page.locator("img").first.evaluate("img => img.previousElementSibling.scrollIntoView()")
    page.screenshot(path=str(out))
    page.close()


def app_picture(browser, run_dir: Path, out: Path) -> None:
    """The app's Classify tab after classifying one of the run's example images, with its 90%
    prediction set."""
    from cifarkit.serve.app import launch
    port = free_port()
    demo = launch(run_dir, port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        from cifarkit.rundir import RunDir
        example = RunDir.open(run_dir).examples()[3]
        page.locator("#input-image input[type=file]").set_input_files(str(example))
        page.get_by_label("90%").check()
        page.click("#classify")
        page.wait_for_selector("#overlay img", timeout=60_000)
        page.get_by_text("prediction set at 90%:", exact=False).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # the overlay's fade-in
        page.screenshot(path=str(out))
        page.close()
    finally:
        demo.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_pictures.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run with its report")
    parser.add_argument("--out", type=Path, default=IMAGES, help="output folder (default docs/images)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CURVE, args.out / CURVE.name)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=ARGS)
        try:
            report_picture(browser, args.run_dir, args.out / "report.png")
            app_picture(browser, args.run_dir, args.out / "app.png")
        finally:
            browser.close()
    for name in ("report.png", "app.png", CURVE.name):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
