"""cifarkit: train, explain and demo CIFAR-10 classifiers."""
from .errors import CifarkitError
from .version import __version__

__all__ = ["CifarkitError", "__version__", "load"]


def load(path, revision=None):
    """A ready model from a run directory, .safetensors file, Hub folder or Hub repository id
    ("user/name", downloaded once into the Hub cache; `revision` pins a branch, tag or commit): eval
    mode, on the CPU, with `.classes`, `.mean`/`.std`, `.preprocess(PIL images)` and
    `.probabilities(PIL images)`."""
    from .weights import load as _load
    return _load(path, revision=revision)
