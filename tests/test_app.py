"""The app: handlers called directly, then the served app driven with gradio_client."""
import numpy as np
import pytest
from PIL import Image

from cifarkit import CifarkitError
from conftest import bad_images, free_port

GOOD = ("rgb.jpg", "gray.png", "rgba.png", "palette.gif", "sixteen.png", "one.png")
BAD = ("text.png", "truncated-rgb.jpg", "truncated-rgba.png")


@pytest.fixture(scope="module")
def app(reported_run):
    from cifarkit.app import RunApp
    return RunApp(reported_run)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f = bad_images(tmp_path_factory.mktemp("uploads"))
    huge = f["rgb.jpg"].parent / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge, optimize=False, compress_level=1)
    f["huge.png"] = huge
    return f


def test_classify_returns_exactly_k_classes_an_overlay_and_the_upscaled_input(app, files):
    for k, expect in ((3, 3), (1, 1), (0, 1), (99, 10)):
        label, overlay, view = app.classify(str(files["rgb.jpg"]), k, 0.5, "block2", "gradcam")
        assert len(label) == expect
        assert all(0 <= p <= 1 for p in label.values()) and set(label) <= set(app.classes)
    assert overlay.shape == view.shape == (256, 256, 3) and overlay.dtype == np.uint8
    assert not np.array_equal(overlay, view)


@pytest.mark.parametrize("name", GOOD)
def test_odd_but_valid_images_are_classified(app, files, name):
    assert len(app.predict({"path": str(files[name])}, 3)) == 3


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
    assert 0 < len(doubtful) <= len(every)
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

    from cifarkit.app import launch
    port = free_port()
    demo = launch(reported_run, port=port, prevent_thread_lock=True, quiet=True)
    yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def test_server_binds_loopback_and_shares_nothing(served):
    demo, _ = served
    assert demo.server_name == "127.0.0.1" and demo.share is False and demo.share_url is None


def test_every_endpoint_answers_through_the_api(served, files):
    from gradio_client import handle_file
    _, client = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/classify", "/predict", "/mistakes", "/gradcam_gallery", "/run_summary"} <= names
    label, overlay, view = client.predict(handle_file(str(files["rgba.png"])), 2, 0.5, "block3", "gradcam++",
                                          api_name="/classify")
    assert len(label["confidences"]) == 2
    assert Image.open(overlay).size == (256, 256) and Image.open(view).size == (256, 256)
    assert len(client.predict(handle_file(str(files["one.png"])), 5, api_name="/predict")["confidences"]) == 5
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
    assert len(client.predict(handle_file(str(files["rgb.jpg"])), 3, api_name="/predict")["confidences"]) == 3


def test_fifty_concurrent_clients_all_get_answers(served, files):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file
    demo, _ = served
    url = f"http://127.0.0.1:{demo.server_port}/"

    def one(i):
        c = Client(url, verbose=False)
        return c.predict(handle_file(str(files["rgb.jpg"])), 3, api_name="/predict")

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert len(answers) == 50 and all(len(a["confidences"]) == 3 for a in answers)
