"""cifarkit: train, explain and demo CIFAR-10 classifiers."""
from .errors import CifarkitError
from .version import __version__

__all__ = ["CifarkitError", "__version__", "load"]


def load(path):
    """A ready model from a run directory, .safetensors file or Hub folder: eval mode, on the CPU,
    with `.classes`, `.mean`/`.std`, `.preprocess(PIL images)` and `.probabilities(PIL images)`."""
    from .weights import load as _load
    return _load(path)
