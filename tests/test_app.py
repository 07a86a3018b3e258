"""The app: handlers called directly, then the served app driven with gradio_client and plain HTTP."""
import csv
import http.client
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.cli import main
from conftest import bad_images, bench_module, free_port

GOOD = ("rgb.jpg", "gray.png", "rgba.png", "palette.gif", "sixteen.png", "one.png")
BAD = ("text.png", "truncated-rgb.jpg", "truncated-rgba.png")


@pytest.fixture(scope="module")
def app(reported_run):
    from cifarkit.serve.app import RunApp
    return RunApp(reported_run)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f = bad_images(tmp_path_factory.mktemp("uploads"))
    huge = f["rgb.jpg"].parent / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge, optimize=False, compress_level=1)
    f["huge.png"] = huge
    return f


def _unknown(app, path) -> bool:
    """Whether the run's out-of-distribution detector calls this image none of its classes."""
    from cifarkit.images import rgb_array
    return bool(app.model.assess(rgb_array(path)[None]).unknown[0])


def _shows(app, path, label, k: int) -> bool:
    """The Label holds exactly k classes, or (for an image the detector flags) the 'none of these' answer."""
    if _unknown(app, path):
        top = max(app.model.probabilities([path])[0].tolist())
        return isinstance(label, str) and label.startswith(f"not one of the {len(app.classes)} classes") and top > 0
    return len(label) == k and all(0 <= p <= 1 for p in label.values()) and set(label) <= set(app.classes)


def _answered(label: dict, k: int) -> bool:
    """An API answer of the Label: k classes, or the 'none of these' answer."""
    return len(label.get("confidences") or []) == k or label["label"].startswith("not one of the")


def test_classify_returns_exactly_k_classes_an_overlay_and_the_upscaled_input(app, files):
    for k, expect in ((3, 3), (1, 1), (0, 1), (99, 10)):
        label, overlay, view, set_line = app.classify(str(files["rgb.jpg"]), k, 0.5, "block2", "gradcam")
        assert _shows(app, files["rgb.jpg"], label, expect) and set_line == ""
    assert overlay.shape == view.shape == (256, 256, 3) and overlay.dtype == np.uint8
    assert not np.array_equal(overlay, view)
    *_, set_line = app.classify(str(files["rgb.jpg"]), 3, 0.5, "block2", "gradcam", "90%")
    assert set_line.startswith("prediction set at 90%: ")
    members = set_line.split(": ", 1)[1]
    assert members == "empty (no class is likely enough)" or set(members.split(", ")) <= set(app.classes)


def test_an_image_the_detector_calls_none_of_the_classes_is_answered_so(reported_run, tmp_path):
    """The app answers "not one of the K classes (looks least unlike: X)" for an image its stored
    detector flags, here a blank page (the run's threshold set just under that page's score: what
    the detector is worth is measured in BENCHMARKS.md, not by this barely trained run)."""
    import shutil

    from cifarkit.serve.app import RunApp
    from cifarkit.weights import update_metadata
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 300), "white").save(blank)
    app = RunApp(run)
    score = float(app.model.assess([blank]).ood_score[0])
    update_metadata(app.run.weights_file, ood_threshold=repr(score - 1e-3))
    app = RunApp(run)
    label = app.predict({"path": str(blank)}, 3)
    top = app.classes[int(app.model.probabilities([blank])[0].argmax())]
    assert label == f"not one of the {len(app.classes)} classes (looks least unlike: {top})"
    update_metadata(app.run.weights_file, ood_threshold=repr(score + 1e-3))   # just over: a class again
    assert isinstance(RunApp(run).predict({"path": str(blank)}, 3), dict)


@pytest.mark.parametrize("name", GOOD)
def test_odd_but_valid_images_are_classified(app, files, name):
    assert _shows(app, files[name], app.predict({"path": str(files[name])}, 3), 3)


@pytest.mark.parametrize("name", BAD + ("huge.png",))
def test_bad_images_get_a_clear_message(app, files, name):
    with pytest.raises(CifarkitError, match="cannot read image|pixel limit"):
        app.classify(str(files[name]), 3)


def test_empty_submit_and_bad_choices(app):
    for empty in (None, "", {"path": None}):
        with pytest.raises(CifarkitError, match="no image"):
            app.predict(empty)
    with pytest.raises(CifarkitError, match="block1, block2, block3"):
        app.gradcam_gallery(3, 0.5, "layer9")
    with pytest.raises(CifarkitError, match="mistakes, correct, random"):
        app.gradcam_gallery(3, 0.5, None, "best")
    with pytest.raises(CifarkitError, match="airplane"):
        app.mistakes(5, "unicorn")


def test_mistakes_are_filtered_and_captioned(app):
    items = app.mistakes(100, "cat", "any")
    assert 0 < len(items) <= 100
    assert all(c.startswith("actual cat / predicted ") and not c.startswith("actual cat / predicted cat ")
               for _, c in items)
    assert all(img.shape == (128, 128, 3) for img, _ in items)
    assert len(app.mistakes(1000)) == 100 and len(app.mistakes(-5)) == 1


def test_mistakes_can_be_filtered_to_likely_label_errors(app, monkeypatch):
    every = app.mistakes(100, "any", "any", "all mistakes")
    doubtful = app.mistakes(100, "any", "any", "likely label errors")
    assert 0 < len(doubtful) <= 20                                      # the flagged ones only
    g = app.gallery
    order = [int(g.index[i]) for i in app._flagged(None, None)]          # in the report's order, each once
    ranked = [int(r["index"]) for r in csv.DictReader(open(app.run.path / "report" / "label_issues.csv"))
              if r["flagged"] == "1"]
    assert order == ranked and len(doubtful) == len(ranked)
    assert all(c.endswith(", likely label error") for _, c in doubtful)
    assert any(not c.endswith(", likely label error") for _, c in every)  # the filter removed some
    assert [c for _, c in app.mistakes(100, "any", "any")] == [c for _, c in every]  # the default: all
    with pytest.raises(CifarkitError, match="all mistakes, likely label errors"):
        app.mistakes(5, "any", "any", "best")
    monkeypatch.setattr(app.gallery, "label_issue", None)               # a gallery from before label issues
    with pytest.raises(CifarkitError, match="cifarkit report") as e:
        app.mistakes(5, "any", "any", "likely label errors")
    assert str(app.run.path) not in str(e.value)                         # no path of the machine
    assert len(app.mistakes(5)) == 5


@pytest.mark.parametrize("which", ["mistakes", "correct", "random"])
def test_gradcam_gallery_for_each_selection(app, which):
    items = app.gradcam_gallery(4, 0.3, "block3", which)
    assert len(items) == 4 and items[0][0].shape == (128, 128, 3)
    if which == "correct":
        assert all(c.split(" / ")[0][7:] == c.split(" / ")[1].split(" (")[0][10:] for _, c in items)


@pytest.fixture(scope="module")
def served(reported_run):
    from gradio_client import Client

    from cifarkit.serve.app import launch
    port = free_port()
    demo = launch(reported_run, port=port, prevent_thread_lock=True, quiet=True)
    yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def test_server_binds_loopback_and_shares_nothing(served):
    demo, _ = served
    assert demo.server_name == "127.0.0.1" and demo.share is False and demo.share_url is None


def test_every_endpoint_answers_through_the_api(served, files, app):
    from gradio_client import handle_file
    _, client = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/classify", "/predict", "/mistakes", "/gradcam_gallery", "/run_summary"} <= names
    label, overlay, view, set_line = client.predict(handle_file(str(files["rgba.png"])), 2, 0.5, "block3",
                                                    "gradcam++", "95%", api_name="/classify")
    assert len(label["confidences"]) == 2 or label["label"].startswith("not one of the")
    assert set_line.startswith("prediction set at 95%: ")
    assert Image.open(overlay).size == (256, 256) and Image.open(view).size == (256, 256)
    one = client.predict(handle_file(str(files["one.png"])), 5, api_name="/predict")
    assert len(one.get("confidences") or []) == 5 if not _unknown(app, files["one.png"]) else one["label"].startswith("not one")
    assert len(client.predict(7, "any", "any", api_name="/mistakes")) == 7
    doubtful = client.predict(3, "any", "any", "likely label errors", api_name="/mistakes")
    assert len(doubtful) == 3 and all(d["caption"].endswith("likely label error") for d in doubtful)
    assert len(client.predict(3, 0.5, "block1", "random", api_name="/gradcam_gallery")) == 3
    assert "Test accuracy" in client.predict(api_name="/run_summary")


@pytest.mark.parametrize("name", BAD + ("huge.png",))
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(served, files, name):
    from gradio_client import handle_file
    _, client = served
    with pytest.raises(Exception, match="cannot read image|pixel limit") as info:
        client.predict(handle_file(str(files[name])), 3, 0.5, "block3", "gradcam", api_name="/classify")
    assert "Traceback" not in str(info.value)
    assert _answered(client.predict(handle_file(str(files["rgb.jpg"])), 3, api_name="/predict"), 3)


def test_fifty_concurrent_clients_all_get_answers(served, files):
    from gradio_client import Client, handle_file
    demo, _ = served
    url = f"http://127.0.0.1:{demo.server_port}/"

    def one(i):
        c = Client(url, verbose=False)
        return c.predict(handle_file(str(files["rgb.jpg"])), 3, api_name="/predict")

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert len(answers) == 50 and all(_answered(a, 3) for a in answers)


def test_upload_limit_is_a_flag_of_cifarkit_app_in_gradio_units(monkeypatch, capsys, tmp_path):
    import cifarkit.serve.app as app_module
    from cifarkit.serve.app import MAX_FILE_SIZE, file_size
    assert file_size(MAX_FILE_SIZE) == 20 * 2**20 and file_size("500kb") == 500 * 2**10 and file_size(7) == 7
    seen = {}
    monkeypatch.setattr(app_module, "launch", lambda run_dir, **kw: seen.update(kw))
    assert main(["app", str(tmp_path), "--max-file-size", "5mb"]) == 0 and seen["max_file_size"] == "5mb"
    monkeypatch.undo()
    assert main(["app", str(tmp_path), "--max-file-size", "lots"]) == 2    # before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max file size 'lots' is not a size; give e.g. 20mb" in err[0]


def test_an_unexpected_failure_is_one_generic_line_in_the_page_naming_no_path():
    import gradio as gr

    from cifarkit.serve.app import _ui

    def fails(path):
        return open(path).read()                                         # FileNotFoundError names the path
    with pytest.raises(gr.Error) as info:
        _ui(fails)("/srv/secret/run/model.safetensors")
    assert "/srv" not in info.value.message and "the server could not answer" in info.value.message


def test_cache_cleaner_deletes_old_uploads_answers_and_their_folders_even_while_requests_add_files(tmp_path):
    import threading
    import time

    import gradio as gr

    from cifarkit.serve.app import _CacheCleaner
    with gr.Blocks() as demo:
        out = gr.Image()
    demo.GRADIO_CACHE = str(tmp_path)
    answers = tmp_path / "cifarkit"
    answers.mkdir()

    def add(folder: str, name: str, keep=False) -> str:
        (tmp_path / folder).mkdir(exist_ok=True)
        f = tmp_path / folder / name
        f.write_bytes(b"x")
        (out.keep_in_cache if keep else out.temp_files).add(str(f))
        return str(f)
    old, answer, example = add("a" * 64, "upload.png"), add("cifarkit", "gradcam-1.png"), add("e" * 64, "ex.png", True)
    cleaner = _CacheCleaner(demo, every=1, age=2, keep=answers)
    time.sleep(2.2)
    new = add("b" * 64, "new.png")
    until = time.monotonic() + 1.0           # cleaning stops well before `new` is 2 s old, however slow it is
    stop = threading.Event()

    def busy():                                  # request threads adding answers meanwhile
        i = 0
        while not stop.is_set():
            add("c" * 64, f"{i}.png")
            i += 1
    t = threading.Thread(target=busy)
    t.start()
    try:
        for _ in range(20):
            cleaner.clean()                          # Gradio's own delete_cache raises here, and stops
            if time.monotonic() > until:
                break
    finally:
        stop.set()
        t.join()
    assert not Path(old).exists() and not Path(answer).exists()
    assert Path(new).exists() and Path(example).exists()
    assert old not in out.temp_files and new in out.temp_files
    assert not (tmp_path / ("a" * 64)).exists()              # the upload's folder went with it
    assert answers.is_dir() and (tmp_path / ("e" * 64)).is_dir()  # our answers' folder and the examples' stay


# -- the served app: what its file routes serve, uploads, identical concurrent requests -----------------


def _get(port: int, path: str) -> int:
    """Status of a GET sent as written (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def _refused(reported_run, cifar_path) -> dict[str, str]:
    run = Path(reported_run).resolve()
    return {
        "etc-passwd": "/etc/passwd",
        "weights": str(run / "model.safetensors"),
        "checkpoint": str(run / "checkpoints" / "last.ckpt"),
        "config": str(run / "config.yaml"),
        "dotdot": f"{tempfile_gradio()}/../../{run.relative_to('/')}/model.safetensors",
        "dotdot-encoded": f"{tempfile_gradio()}/%2e%2e/%2e%2e/{run.relative_to('/')}/model.safetensors",
        "training-data": str(cifar_path.resolve()),
    }


def tempfile_gradio() -> str:
    from gradio.utils import get_upload_folder
    return get_upload_folder()


@pytest.mark.parametrize("what", ["etc-passwd", "weights", "checkpoint", "config", "dotdot", "dotdot-encoded",
                                  "training-data"])
def test_file_routes_refuse_anything_but_the_apps_own_display_files(served, reported_run, cifar_path, what):
    demo, _ = served
    path = _refused(reported_run, cifar_path)[what]
    assert _get(demo.server_port, f"/gradio_api/file={path}") == 403
    assert _get(demo.server_port, f"/file={path}") in (403, 404)


def test_file_routes_serve_the_examples_and_figures_from_gradios_copies(served, reported_run):
    demo, _ = served
    config = urllib.request.urlopen(f"http://127.0.0.1:{demo.server_port}/config").read().decode()
    urls = set(re.findall(r'"url":\s*"(http://127\.0\.0\.1:\d+/gradio_api/file=[^"]+)"', config))
    names = {u.rsplit("/", 1)[-1] for u in urls}
    assert {p.name for p in (reported_run / "examples").glob("*.png")} <= names and "curves.png" in names
    assert str(Path(reported_run).resolve()) not in config                    # copies, not the run itself
    assert all(urllib.request.urlopen(u).status == 200 for u in urls)


def _upload(port: int, name: str, size: int) -> tuple[int, str]:
    """A raw POST to /gradio_api/upload that stops sending once the server answers (the soak's client)."""
    return bench_module("app_soak").upload_status(port, name, size)


def test_uploads_over_the_limit_are_refused_before_they_are_stored(served, files):
    from gradio_client import handle_file
    demo, client = served
    assert demo.max_file_size == 20 * 2**20
    status, text = _upload(demo.server_port, "big-upload.png", 21 * 2**20)
    assert status == 413 and "maximum allowed size" in text
    assert not list(Path(tempfile_gradio()).rglob("big-upload.png"))    # nothing kept of it
    status, text = _upload(demo.server_port, "small-upload.png", 2**20)  # under the limit: stored
    assert status == 200 and "small-upload.png" in text
    assert _answered(client.predict(handle_file(str(files["rgb.jpg"])), 3, api_name="/predict"), 3)


def test_messages_in_the_page_name_only_the_uploaded_files_own_name(served, tmp_path):
    from gradio_client import handle_file
    _, client = served
    secret = tmp_path / "private-folder" / "holiday.png"
    secret.parent.mkdir()
    secret.write_text("not an image")
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(secret)), 3, 0.5, "block3", "gradcam", api_name="/classify")
    assert str(info.value) == "cannot read image holiday.png: not a known image format"
    assert not re.search(r"/tmp|gradio|private-folder", str(info.value))


def _open_all(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()                                                       # a cut-short file raises here
        return np.asarray(im)


def test_fifty_clients_sending_the_same_example_to_every_endpoint_get_complete_identical_answers(served, reported_run):
    from gradio_client import Client, handle_file
    demo, _ = served
    url = f"http://127.0.0.1:{demo.server_port}/"
    example = str(sorted((reported_run / "examples").glob("*.png"))[3])
    calls = {
        "classify": ((handle_file(example), 3, 0.5, "block3", "gradcam"), "/classify",
                     lambda r: (r[0]["label"], _open_all(r[1]), _open_all(r[2]))),
        "predict": ((handle_file(example), 3), "/predict", lambda r: r["label"]),
        "mistakes": ((8, "any", "any"), "/mistakes", lambda r: [_open_all(x["image"]) for x in r]),
        "gradcam_gallery": ((4, 0.5, "block3", "mistakes"), "/gradcam_gallery",
                            lambda r: [_open_all(x["image"]) for x in r]),
    }
    with ThreadPoolExecutor(50) as pool:
        clients = list(pool.map(lambda i: Client(url, verbose=False), range(50)))
        for name, (args, api, read) in calls.items():               # all 50 on one endpoint at once
            answers = list(pool.map(lambda c: read(c.predict(*args, api_name=api)), clients))
            first = answers[0]
            for a in answers[1:]:
                assert len(a) == len(first), name
                for x, y in zip(a, first):
                    assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name

