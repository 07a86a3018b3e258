"""cifarkit: train, explain and demo CIFAR-10 classifiers."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cifarkit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .errors import CifarkitError  # noqa: E402

__all__ = ["CifarkitError", "__version__"]
