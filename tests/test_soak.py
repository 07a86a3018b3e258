"""bench/app_soak.py in its short mode (1 minute, 5 clients): the served app under mixed traffic keeps
its memory, open files and cache within the bounds the script states, and every call gets its answer."""
import re
import subprocess
import sys

from conftest import ROOT


def test_soak_short_mode_keeps_memory_descriptors_and_cache_within_bounds(reported_run):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "app_soak.py"), str(reported_run), "--short"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for endpoint in ("classify", "predict", "mistakes", "gradcam_gallery", "bad_upload", "oversize_upload"):
        assert re.search(rf"^{endpoint}\s+[1-9]\d*\s+0\s+\d+\s+\d+$", r.stdout, re.M), r.stdout
    assert "ok: every bound held" in r.stdout
