"""The exported Space folder, started the way a Space starts it: `python app.py` in a fresh virtual
environment holding only its requirements."""
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cifarkit import CifarkitError
from cifarkit.serve.space import export_space
from conftest import bad_images, free_port


def test_space_folder_is_complete(reported_run, tmp_path):
    out = export_space(reported_run, tmp_path / "space")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "requirements.txt", "README.md", "run/model.safetensors", "run/gallery.npz",
            "cifarkit/serve/app.py", "cifarkit/weights.py"} <= names
    assert sum(n.startswith("run/examples/") for n in names) == 10
    readme = (out / "README.md").read_text()
    header = readme.split("---")[1]
    for key in ("sdk: gradio", "sdk_version:", "python_version:", "app_file: app.py"):
        assert key in header
    app_py = (out / "app.py").read_text()
    assert 'MAX_FILE_SIZE = "20mb"' in app_py and "serve_options(demo, max_file_size=MAX_FILE_SIZE)" in app_py
    assert "allowed_paths" not in app_py                    # run/ (the weights) is never served
    reqs = (out / "requirements.txt").read_text().split()
    assert any(r.startswith("gradio==") for r in reqs) and any(r.startswith("torch==") for r in reqs)
    with pytest.raises(CifarkitError, match="not empty"):
        export_space(reported_run, out)


@pytest.mark.slow
def test_space_runs_in_a_fresh_venv_with_only_its_requirements(reported_run, tmp_path):
    from gradio_client import Client, handle_file
    out = export_space(reported_run, tmp_path / "space")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # every requirement and its dependencies installed, as on a Space; --no-compile leaves out
    # byte-compiling the 12,000 modules of the 6 GB installed (torch and its CUDA libraries; a third of
    # the install's CPU time): the modules the app imports are compiled as it imports them
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "-r", "requirements.txt"], cwd=out,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CIFARKIT_DATA")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([str(py), "app.py"], cwd=out, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        client = None
        for _ in range(120):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(1)
        assert client is not None, "the Space did not start within 120 s"
        img = bad_images(tmp_path / "img")["rgb.jpg"]
        label, overlay, view, set_line = client.predict(handle_file(str(img)), 3, 0.5, "block3", "gradcam",
                                                        "90%", api_name="/classify")
        assert len(label["confidences"]) == 3
        weights = (out / "run" / "model.safetensors").resolve()
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={weights}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
