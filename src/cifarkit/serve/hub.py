"""`cifarkit push`: a run to a model repository on the Hugging Face Hub (and its Space) in one call.

Everything that goes up is staged first, outside the run directory, by the same writers as
`export --format hub` and `export-space`; `--dry-run` stops there and shows it. The upload is
huggingface_hub's create_repo + upload_folder: a re-push is one new commit per repository that
adds or replaces the files it wrote and deletes nothing. The token is huggingface_hub's own
(HF_TOKEN or `hf auth login`): cifarkit never writes, prints or stores it.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CifarkitError
from ..rundir import RunDir
from ..weights import load
from .export import export_hub
from .space import export_space

LOGIN = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # USER/NAME (or ORG/NAME)


@dataclass
class Staged:
    """The folders a push uploads, and what reached the Hub so far."""
    run: RunDir
    repo: str
    model: Path
    space_repo: str | None = None
    space: Path | None = None
    reached: list[str] = field(default_factory=list)


def check_repo_id(repo: str, what: str = "--repo") -> str:
    """USER/NAME as the Hub accepts it (huggingface_hub's own rules), or one line saying why not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not NAME.match(repo or ""):
        raise CifarkitError(f"{what} '{repo}' is not a repository id: give USER/NAME (letters, digits, '-', '_', '.')")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise CifarkitError(f"{what} '{repo}' is not a repository id: {str(exc).splitlines()[0]}") from None
    return repo


def stage(run_dir: str | Path, repo: str, space: str | None = None, bundle: bool = False,
          license: str = "mit", dest: str | Path | None = None) -> Staged:
    """The model folder (and the Space folder) in `dest` (default: a new temporary folder)."""
    check_repo_id(repo)
    if space is not None and check_repo_id(space, "--space").lower() == repo.lower():
        raise CifarkitError(f"--space '{space}' is the model repository's id; give the Space another name, "
                            f"e.g. {repo}-demo")
    run = RunDir.open(run_dir, need=("weights", "results"))
    root = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="cifarkit-push-"))
    try:
        model = export_hub(load(run.path), root / "model", run, repo, license)
    except OSError as exc:
        raise CifarkitError(f"cannot stage the push in {root}: {exc.strerror or exc}") from None
    space_dir = export_space(run.path, root / "space", repo, bundle) if space else None
    return Staged(run, repo, model, space, space_dir)


def files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file upload_folder sends from `folder`."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def describe(staged: Staged) -> str:
    """What a dry run shows: where the folders are, each file with its size, the card's metadata."""
    from huggingface_hub import ModelCard
    lines = [f"staged in {staged.model.parent} (nothing uploaded)"]
    for repo, kind, folder in ((staged.repo, "model", staged.model), (staged.space_repo, "Space", staged.space)):
        if folder is None:
            continue
        listed = files(folder)
        lines.append(f"{kind} {repo}: {len(listed)} files, {sum(s for _, s in listed) / 1e6:.1f} MB")
        lines += [f"  {size:>12,}  {name}" for name, size in listed]
    card = ModelCard.load(staged.model / "README.md")
    lines += ["model card metadata:", *("  " + ln for ln in card.data.to_yaml().splitlines())]
    return "\n".join(lines)


def token() -> str:
    """huggingface_hub's token (HF_TOKEN, or the one `hf auth login` stored); never printed."""
    from huggingface_hub import get_token
    found = get_token()
    if not found:
        raise CifarkitError(f"no Hugging Face token: {LOGIN}")
    return found


def commit_message(staged: Staged, what: str) -> str:
    res = staged.run.read_results()
    acc = f", test accuracy {res.test_acc:.2%}" if res and res.test_acc is not None else ""
    return f"cifarkit push: {what} of run {staged.run.name}{acc}"


def upload(staged: Staged, private: bool = False, api=None) -> list[str]:
    """Create the repositories if needed and upload each folder as one commit; the URLs reached.
    A failure half way is one line that says what reached the Hub."""
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token())
    steps = [(staged.repo, "model", staged.model, {}, "the model")]
    if staged.space is not None:
        steps.append((staged.space_repo, "space", staged.space, {"space_sdk": "gradio"}, "the Space"))
    for repo, kind, folder, extra, what in steps:
        with _hub_errors(staged, f"creating {kind} repository {repo}"):
            api.create_repo(repo, repo_type=kind, private=private, exist_ok=True, **extra)
        with _hub_errors(staged, f"uploading {what} to {repo}"):
            info = api.upload_folder(repo_id=repo, repo_type=kind, folder_path=str(folder),
                                     commit_message=commit_message(staged, what))
        staged.reached.append(f"{what} ({repo}, {getattr(info, 'commit_url', None) or 'committed'})")
    return staged.reached


@contextmanager
def _hub_errors(staged: Staged, doing: str):
    """A failed Hub call as one line: a token to renew, or what broke and what reached the Hub."""
    try:
        yield
    except CifarkitError:
        raise
    except Exception as exc:  # huggingface_hub's HTTP errors, the network's, the disk's
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise CifarkitError(f"the Hub rejected the token (401) while {doing}: {LOGIN}") from None
        reached = "; ".join(staged.reached) or "nothing"
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CifarkitError(f"push failed while {doing}: {why}; reached the Hub: {reached}; the run "
                            "directory is unchanged: push again to finish") from None


def push(run_dir: str | Path, repo: str, space: str | None = None, private: bool = False,
         dry_run: bool = False, bundle: bool = False, license: str = "mit", api=None) -> Staged:
    """Stage, then (unless `dry_run`) upload; `api`: an HfApi (or a stand-in with its methods).
    The token is looked for first, so that a missing one fails before anything is staged."""
    if not dry_run and api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token())
    staged = stage(run_dir, repo, space, bundle, license)
    if not dry_run:
        try:
            upload(staged, private, api)
        finally:
            shutil.rmtree(staged.model.parent, ignore_errors=True)  # a copy; the run is the original
    return staged
