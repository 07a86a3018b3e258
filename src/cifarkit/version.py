"""The one place the version lives (pyproject reads it; every module that records it imports it here)."""
__version__ = "0.1.0"
