"""cifarkit: train, explain and demo CIFAR-10 classifiers."""
__version__ = "0.1.0"  # the one place the version lives (pyproject reads it)

from .errors import CifarkitError  # noqa: E402

__all__ = ["CifarkitError", "__version__", "load"]


def load(path):
    """A ready model from a run directory, .safetensors file or Hub folder: eval mode, on the CPU,
    with `.classes`, `.mean`/`.std`, `.preprocess(PIL images)` and `.probabilities(PIL images)`."""
    from .weights import load as _load
    return _load(path)
