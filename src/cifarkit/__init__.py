"""cifarkit: train, explain and demo CIFAR-10 classifiers."""
from .errors import CifarkitError
from .version import __version__

__all__ = ["CifarkitError", "__version__", "load"]


def load(path, revision=None):
    """A ready model from a run directory, .safetensors file, Hub folder or Hub repository id
    ("user/name", downloaded once into the Hub cache; `revision` pins a branch, tag or commit): eval
    mode, on the CPU, with `.classes`, `.mean`/`.std`, `.preprocess(PIL images)`,
    `.probabilities(PIL images)` and `.assess(PIL images, coverage=0.9)`: probabilities, an
    out-of-distribution score and verdict ("none of these"), and prediction sets."""
    from .serve.predict import load_model
    return load_model(path, revision=revision)
