"""Publishing to the Hugging Face Hub and loading back from it, with no network: everything up to the
HTTP call runs for real (staging, the card, huggingface_hub's token lookup, HfApi itself); only
HfApi.create_repo and HfApi.upload_folder are replaced by recorders. Loading goes through
hf_hub_download / snapshot_download on a Hub cache folder with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, metadata_load

from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.serve.hub import check_repo_id, files, stage
from cifarkit.weights import load, locate
from conftest import ROOT

TOKEN = "hf_cifarkitTestSentinelTokenNeverToBeSeen"
REPO, SPACE = "alice/cifar-tiny", "alice/cifar-tiny-demo"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A token in HF_TOKEN, staging under tmp_path, and HfApi's two upload calls recorded."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, {**kw, "files": files(Path(folder_path))}, self.token))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{len(calls):040d}"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _tree(folder) -> dict:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _machine_paths(run) -> list[str]:
    run = Path(run)
    data = json.loads((run / "results.json").read_text())["data"]
    return [str(run), str(run.parent.parent), data, str(ROOT), os.getcwd(), str(Path.home()) + "/"]


def test_card_parses_back_with_huggingface_hubs_loader_and_holds_the_runs_numbers(reported_run, tmp_path):
    staged = stage(reported_run, REPO, dest=tmp_path / "stage")
    meta = metadata_load(staged.model / "README.md")
    res = json.loads((reported_run / "results.json").read_text())
    assert meta["library_name"] == "cifarkit" and meta["license"] == "mit" and "image-classification" in meta["tags"]
    (entry,) = meta["model-index"]
    assert entry["name"] == "cifar-tiny"
    (result,) = entry["results"]
    assert result["dataset"]["name"] == "CIFAR-10, JPEG-q75 copy" and result["dataset"]["split"] == "test"
    got = {m["name"].split(" (")[0]: m["value"] for m in result["metrics"]}
    assert got == {"Test accuracy": round(res["test_acc"], 4),
                   "Expected calibration error after temperature scaling": round(res["ece_after"], 4),
                   "Mean corruption accuracy": round(res["mean_corruption_accuracy"], 4)}
    body = (staged.model / "README.md").read_text()
    assert f'cifarkit.load("{REPO}")' in body and "cifarkit train --config config.yaml" in body
    assert "![curves](report/curves.png)" in body and (staged.model / "report" / "curves.png").is_file()


def test_nothing_pushed_names_a_path_of_this_machine_or_the_token(reported_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    staged = stage(reported_run, REPO, SPACE, dest=tmp_path / "stage")
    pushed = [p for folder in (staged.model, staged.space) for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in pushed} >= {"model.safetensors", "config.json", "config.yaml", "results.json",
                                        "gallery.npz", "README.md", "app.py", "requirements.txt"}
    for p in pushed:
        raw = p.read_bytes()
        for needle in _machine_paths(reported_run) + [TOKEN]:
            assert needle.encode() not in raw, (p, needle)
    assert load(staged.model).meta["temperature"] == load(reported_run).meta["temperature"]


def test_dry_run_lists_exactly_the_folder_that_would_go_up_and_uploads_nothing(reported_run, hub_env, capsys):
    before = _tree(reported_run)
    assert main(["push", str(reported_run), "--repo", REPO, "--space", SPACE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not hub_env and TOKEN not in out and _tree(reported_run) == before
    root = Path(out.splitlines()[0].split("staged in ")[1].split(" (")[0])
    model_part, space_part = out.split("model card metadata:")[0].split(f"Space {SPACE}:")
    for kind, text in (("model", model_part), ("space", space_part)):
        shown = {ln.split()[1]: int(ln.split()[0].replace(",", "")) for ln in text.splitlines()
                 if ln.startswith("  ")}
        assert shown == dict(files(root / kind)), kind
    assert "model-index:" in out and "license: mit" in out


def test_push_creates_both_repositories_and_commits_each_folder_once_naming_the_run(reported_run, hub_env, capsys):
    before = _tree(reported_run)
    for _ in range(2):  # a re-push is one more commit per repository, and deletes nothing
        assert main(["push", str(reported_run), "--repo", REPO, "--space", SPACE, "--private"]) == 0
    out = capsys.readouterr().out
    assert [(c[0], c[1], c[2].get("repo_type")) for c in hub_env] == 2 * [
        ("create_repo", REPO, "model"), ("upload_folder", REPO, "model"),
        ("create_repo", SPACE, "space"), ("upload_folder", SPACE, "space")]
    creates = [c[2] for c in hub_env if c[0] == "create_repo"]
    assert all(c["exist_ok"] and c["private"] for c in creates) and creates[1]["space_sdk"] == "gradio"
    uploads = [c[2] for c in hub_env if c[0] == "upload_folder"]
    assert all(u.get("delete_patterns") is None for u in uploads)
    assert all(reported_run.name in u["commit_message"] for u in uploads)
    model_files, space_files = dict(uploads[0]["files"]), dict(uploads[1]["files"])
    assert {"model.safetensors", "config.json", "README.md", "gallery.npz", "report/curves.png"} <= set(model_files)
    assert "run/model.safetensors" not in space_files                # the Space downloads the model repository
    assert all(c[3] == TOKEN for c in hub_env)                       # huggingface_hub's own token, passed on
    assert TOKEN not in out and REPO in out and _tree(reported_run) == before
    assert not list(Path(tempfile.gettempdir()).iterdir())           # the staging copy is gone


def test_space_from_the_model_repository_names_it_and_bundle_carries_the_run(reported_run, tmp_path):
    linked = stage(reported_run, REPO, SPACE, dest=tmp_path / "a").space
    assert f"  - {REPO}" in (linked / "README.md").read_text().split("---")[1]
    assert f'MODEL_REPO = "{REPO}"' in (linked / "app.py").read_text() and not (linked / "run").exists()
    assert "huggingface_hub==" in (linked / "requirements.txt").read_text()
    bundled = stage(reported_run, REPO, SPACE, bundle=True, dest=tmp_path / "b").space
    assert (bundled / "run" / "model.safetensors").is_file() and "MODEL_REPO" not in (bundled / "app.py").read_text()


def test_an_upload_that_fails_half_way_says_what_reached_the_hub(reported_run, hub_env, monkeypatch, capsys):
    real = HfApi.upload_folder

    def drop_on_space(self, *, repo_id, **kw):
        if kw.get("repo_type") == "space":
            raise ConnectionError("Connection reset by peer")
        return real(self, repo_id=repo_id, **kw)

    monkeypatch.setattr(HfApi, "upload_folder", drop_on_space)
    before = _tree(reported_run)
    assert main(["push", str(reported_run), "--repo", REPO, "--space", SPACE]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uploading the Space" in err and "Connection reset" in err
    assert f"reached the Hub: the model ({REPO}, https://huggingface.co/{REPO}/commit/" in err
    assert _tree(reported_run) == before and TOKEN not in err


def _http_error(status: int):
    import importlib

    from huggingface_hub import errors
    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = errors.Response(status, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    return errors.HfHubHTTPError(f"{status} Client Error: Unauthorized", response=response)


def test_a_missing_or_rejected_token_is_one_line_saying_how_to_log_in(reported_run, hub_env, monkeypatch,
                                                                     tmp_path, capsys):
    from huggingface_hub import constants
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(reported_run), "--repo", REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "no Hugging Face token" in err and "hf auth login" in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def reject(self, repo_id, **kw):
        raise _http_error(401)

    monkeypatch.setattr(HfApi, "create_repo", reject)
    assert main(["push", str(reported_run), "--repo", REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "rejected the token" in err and "HF_TOKEN" in err and TOKEN not in err


def test_bad_repository_ids_a_space_named_as_the_model_and_unfinished_runs_are_one_line(reported_run, tmp_path):
    for bad in ("cifar-tiny", "a/b/c", "alice/has space", "alice/-x", "alice/x..y"):
        with pytest.raises(CifarkitError, match="not a repository id"):
            check_repo_id(bad)
    with pytest.raises(CifarkitError, match="the model repository's id"):
        stage(reported_run, REPO, REPO.upper(), dest=tmp_path / "s")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((reported_run / "config.yaml").read_text())
    with pytest.raises(CifarkitError, match="has no model.safetensors; the run did not finish"):
        stage(unfinished, REPO, dest=tmp_path / "s2")


def _hub_cache(folder: Path, cache: Path, repo: str) -> str:
    """`folder` as huggingface_hub lays a downloaded repository out in its cache: blobs, a snapshot of
    links to them, and refs/main naming the snapshot's commit. Returns the commit."""
    commit = "c1f" + "0" * 37
    root = cache / f"models--{repo.replace('/', '--')}"
    for i, (name, _) in enumerate(files(folder)):
        blob = root / "blobs" / f"{i:064x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes((folder / name).read_bytes())
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


OFFLINE_CHECK = """
import json, sys
import numpy as np
import cifarkit
from cifarkit.cli import main
from cifarkit.serve.app import RunApp
repo, commit, image = sys.argv[1:4]
x = np.load(image)
out = {"latest": cifarkit.load(repo).probabilities(x).tolist(),
       "pinned": cifarkit.load(f"{repo}@{commit}").probabilities(x).tolist(),
       "app_examples": len(RunApp(repo).examples),
       "not_cached": main(["predict", "bob/not-cached", sys.argv[4]])}
print(json.dumps(out))
sys.exit(main(["predict", repo, sys.argv[4], "--json"]))
"""


def test_a_model_repository_in_the_hub_cache_loads_offline_and_predicts_as_the_run(reported_run, tmp_path):
    staged = stage(reported_run, REPO, dest=tmp_path / "stage")
    commit = _hub_cache(staged.model, tmp_path / "hub", REPO)
    x = np.load(reported_run / "gallery.npz")["images"][:8]                   # (8, 32, 32, 3) uint8
    np.save(tmp_path / "x.npy", x)
    example = sorted((reported_run / "examples").glob("*.png"))[0]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", OFFLINE_CHECK, REPO, commit, str(tmp_path / "x.npy"), str(example)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, rest = r.stdout.split("\n", 1)
    got = json.loads(first)
    ref = load(reported_run).probabilities(x).numpy()
    assert np.array_equal(np.array(got["latest"], dtype=np.float32), ref)
    assert np.array_equal(np.array(got["pinned"], dtype=np.float32), ref)
    assert got["app_examples"] == 10
    assert json.loads(rest)["predictions"][0]["image"].endswith(example.name)
    assert got["not_cached"] == 2
    (line,) = [ln for ln in r.stderr.splitlines() if "bob/not-cached" in ln]
    assert "not in the Hub cache" in line and "download it once while online" in line


def test_a_repository_that_is_not_a_cifarkit_model_is_one_line_naming_what_is_missing(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import errors

    def no_such_file(repo_id, filename, **kw):
        raise errors.EntryNotFoundError(f"{filename} not found in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    with pytest.raises(CifarkitError, match="bob/bert is not a cifarkit model: it has no model.safetensors"):
        load("bob/bert")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bob" / "bert").mkdir(parents=True)       # a local folder of that name wins, and is no model
    with pytest.raises(CifarkitError, match="no weights at bob/bert"):
        load("bob/bert")
    assert locate("bob/bert") == Path("bob/bert")
