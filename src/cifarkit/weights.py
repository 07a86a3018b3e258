"""Final weights as safetensors with the metadata needed to use them: model, classes, mean/std, size,
and the temperature that calibrates its probabilities (`cifarkit calibrate`; 1.0 when never fitted).

Reading never unpickles; everything downstream of training (test, predict, report, app, export)
starts from `load(path)` on a run directory, a .safetensors file, a Hub folder, or a model repository
on the Hugging Face Hub ("user/name", "user/name@revision"), which `locate` downloads once into the
Hub's own cache and reads from there afterwards (offline too, with HF_HUB_OFFLINE=1). Images become
probabilities on one path: logits() -> to_probabilities(logits, T) = softmax(logits / T).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .version import __version__
from .errors import CifarkitError
from .images import normalize, rgb_batch
from .models import MODELS, build_model
from .rundir import WEIGHTS_NAME, RunDir, atomic_path


STATS_PREFIX = "stats."  # tensors stored beside the net's: statistics fitted on held-out images


@dataclass
class Loaded:
    net: nn.Module
    classes: list[str]
    mean: list[float]
    std: list[float]
    meta: dict
    stats: dict = field(default_factory=dict)  # name (without STATS_PREFIX) -> tensor

    @property
    def temperature(self) -> float:
        """T of softmax(logits / T), fitted on held-out data; 1.0 for weights never calibrated."""
        return float(self.meta.get("temperature", 1.0))

    def normalize(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 32, 32, 3) -> normalized float (B, 3, 32, 32), as in training."""
        return normalize(torch.as_tensor(x), self.mean, self.std)

    def preprocess(self, images) -> torch.Tensor:
        """Files, bytes, PIL images (any size or mode) or a uint8 array -> normalized (B, 3, 32, 32)."""
        return self.normalize(rgb_batch(images))

    def logits(self, images, batch_size: int = 1000, autocast: bool = False) -> torch.Tensor:
        """Raw logits (B, K), before the temperature, of files, PIL images or uint8 images."""
        return logits(self.net, rgb_batch(images), self.mean, self.std, batch_size, autocast)

    def features_and_logits(self, images, batch_size: int = 1000, autocast: bool = False):
        """(penultimate features (B, D), raw logits (B, K)) of files, PIL images or uint8 images."""
        return features_and_logits(self.net, rgb_batch(images), self.mean, self.std, batch_size, autocast)

    def to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (B, K) of raw logits from `logits()`."""
        return to_probabilities(logits, self.temperature)

    def probabilities(self, images, batch_size: int = 1000, autocast: bool = False) -> torch.Tensor:
        """Calibrated class probabilities (B, K) of files, PIL images or uint8 images (B, 32, 32, 3)."""
        return self.to_probabilities(self.logits(images, batch_size, autocast))


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters(), torch.zeros(0)).device


@torch.no_grad()
def _batched(fn, net: nn.Module, images: np.ndarray, mean, std, batch_size: int, autocast: bool) -> list:
    """fn(net, normalized batch) over uint8 images (N, 32, 32, 3) in batches on the net's device, in
    eval mode: one tuple of CPU float tensors per batch. autocast: bf16 where the device runs it
    natively (about 2x on a CPU with AVX-512 bf16); for accuracy over many images, not for the
    probabilities shown to a user."""
    net, dev = net.eval(), _device(net)
    x = torch.as_tensor(images)
    use_bf16 = autocast and (dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 8)
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size].to(dev), mean, std)                   # (B, 3, 32, 32)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            out.append(tuple(t.float().cpu() for t in fn(net, xb)))
    return out


def logits(net: nn.Module, images: np.ndarray, mean, std, batch_size: int = 1000,
           autocast: bool = False) -> torch.Tensor:
    """THE path from uint8 images (N, 32, 32, 3) to logits (N, K) on the CPU (see _batched)."""
    out = _batched(lambda n, xb: (n(xb),), net, images, mean, std, batch_size, autocast)
    return torch.cat([o[0] for o in out]) if out else torch.zeros(0, 0)


def features_and_logits(net: nn.Module, images: np.ndarray, mean, std, batch_size: int = 1000,
                        autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same path to (penultimate features (N, D), logits (N, K)): net.head(net.features(x))."""
    def both(n, xb):
        f = n.features(xb)
        return f, n.head(f)
    out = _batched(both, net, images, mean, std, batch_size, autocast)
    if not out:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def to_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) (N, K): the predicted class never changes, only how sure it is."""
    return torch.softmax(torch.as_tensor(logits).float() / float(temperature), dim=1)


def probabilities(net: nn.Module, images: np.ndarray, mean, std, batch_size: int = 1000,
                  temperature: float = 1.0) -> torch.Tensor:
    """uint8 images (N, 32, 32, 3) -> probabilities (N, K) = softmax(logits / temperature)."""
    return to_probabilities(logits(net, images, mean, std, batch_size), temperature)


def save_weights(net: nn.Module, path: Path, model: str, classes: list[str], mean, std,
                 model_kwargs: dict | None = None, extra: dict | None = None, stats: dict | None = None) -> None:
    meta = {"model": model, "classes": json.dumps(list(classes)), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "input_size": "32", "model_kwargs": json.dumps(model_kwargs or {}),
            "cifarkit_version": __version__}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({STATS_PREFIX + k: v.detach().cpu().contiguous() for k, v in (stats or {}).items()})
    _save(tensors, meta, Path(path))


def _save(tensors: dict, meta: dict, path: Path) -> None:
    with atomic_path(path) as tmp:  # a reader sees the old file or the new one, never half of one
        save_file(tensors, str(tmp), metadata=meta)


def update_metadata(path: str | Path, stats: dict | None = None, **values) -> None:
    """Rewrite a weights file with the same tensors and these metadata values added or replaced, and
    `stats` (name -> tensor) stored beside the net's tensors (replacing those of the same name)."""
    p = weights_path(path)
    meta, tensors = _read(p)
    tensors.update({STATS_PREFIX + k: v.detach().cpu().contiguous() for k, v in (stats or {}).items()})
    _save(tensors, {**meta, **{k: str(v) for k, v in values.items()}}, p)


def weights_path(path: str | Path) -> Path:
    """The weights file of a run directory or Hub folder, or the .safetensors file given."""
    p = Path(path)
    if p.is_dir():
        if RunDir(p).is_run():
            return RunDir.open(p, need=("weights",)).weights_file
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise CifarkitError(f"no weights at {p}: give a finished run directory, a Hub folder or a .safetensors file")
    return p


# "user/name" or "user/name@revision": a model repository on the Hub (a local path wins when it exists)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def locate(source: str | Path, revision: str | None = None, files: tuple[str, ...] | None = (WEIGHTS_NAME,)) -> Path:
    """A local path as it is; a Hub repository id as its folder in the Hub cache, holding `files`
    (None: the whole repository). Downloads go through huggingface_hub, so a second call, or any call
    with HF_HUB_OFFLINE=1, reads the cache and makes no request."""
    p = Path(source)
    text = str(source)
    if p.exists() or not HUB_ID.match(text):
        return p
    repo, _, pinned = text.partition("@")
    return _from_hub(repo, revision or pinned or None, files)


def _from_hub(repo: str, revision: str | None, files: tuple[str, ...] | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub import errors as hub
    except ImportError:
        raise CifarkitError(f"{repo} is not a local path; loading it from the Hugging Face Hub needs "
                            "huggingface_hub: pip install huggingface_hub") from None
    name = None
    try:
        if files is None:
            return Path(snapshot_download(repo, revision=revision))
        for name in files:
            path = Path(hf_hub_download(repo, name, revision=revision))
        return path.parents[len(Path(name).parts) - 1]  # the snapshot folder that holds them all
    except hub.LocalEntryNotFoundError:  # before EntryNotFoundError, its parent
        raise CifarkitError(f"{repo} is no local path, and not in the Hub cache while the Hub cannot be reached "
                            "(offline, or HF_HUB_OFFLINE is set): download it once while online") from None
    except hub.EntryNotFoundError:
        raise CifarkitError(f"{repo} is not a cifarkit model: it has no {name}") from None
    except hub.RevisionNotFoundError:
        raise CifarkitError(f"{repo} has no revision '{revision}'; give a branch, tag or commit of it") from None
    except hub.RepositoryNotFoundError:
        raise CifarkitError(f"{repo} is neither a local path nor a model repository on the Hub (a private one "
                            "needs a login: `hf auth login` or HF_TOKEN)") from None
    except (hub.HfHubHTTPError, OSError, ValueError) as exc:
        raise CifarkitError(f"cannot download {repo} from the Hub: {str(exc).splitlines()[0]}") from None


def identify(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(model, class count) of the registered architecture whose state_dict these tensors fill."""
    for name in MODELS:
        ref = build_model(name, 1).state_dict()
        if ref.keys() != tensors.keys():
            continue
        head = [k for k in ref if ref[k].shape != tensors[k].shape]  # only the classifier's shapes differ
        if all(ref[k].shape[1:] == tensors[k].shape[1:] for k in head):
            return name, (tensors[head[0]].shape[0] if head else 1)
    return None


def _describe(found: tuple[str, int] | None) -> str:
    return f"'{found[0]}' with {found[1]} classes" if found else "a model cifarkit does not know"


def _read(p: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(p))
    except (SafetensorError, OSError, Exception) as exc:
        raise CifarkitError(f"cannot read weights {p}: {str(exc).splitlines()[0]}") from None


def load(path: str | Path, expect: tuple[str, int] | None = None, revision: str | None = None) -> Loaded:
    """A ready model (eval mode, CPU) with its classes and normalization, from a run dir, a file, a
    Hub folder or a Hub repository id (`revision`: a branch, tag or commit of it).

    `expect` = (model, class count) the caller needs; other weights are a one-line error naming both.
    """
    p = weights_path(locate(path, revision))
    meta, tensors = _read(p)
    if "model" not in meta or "classes" not in meta:
        raise CifarkitError(f"{p} has no cifarkit metadata (model name and classes)")
    classes = json.loads(meta["classes"])
    said = (meta["model"], len(classes))
    if expect is not None and tuple(expect) != said:
        raise CifarkitError(f"weights {p} are for {_describe(said)}, not {_describe(tuple(expect))}; "
                            "give the weights of a run of that model")
    net = build_model(meta["model"], len(classes), **json.loads(meta.get("model_kwargs", "{}")))
    stats = {k[len(STATS_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(STATS_PREFIX)}
    try:
        net.load_state_dict(tensors)
    except RuntimeError:
        raise CifarkitError(f"weights {p} hold {_describe(identify(tensors))}, but their metadata says "
                            f"{_describe(said)}; the file was altered: use the run's own weights") from None
    net = net.eval().to(memory_format=torch.channels_last)  # ~1.4x faster on CPU
    return Loaded(net, classes, json.loads(meta["mean"]), json.loads(meta["std"]), meta, stats)
