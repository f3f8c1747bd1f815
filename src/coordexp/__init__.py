"""CoordExp: teach vision-language models to detect objects by writing coordinate tokens."""

__version__ = "0.1.0"
__all__ = ["Detector"]


def __getattr__(name: str):
    """`from coordexp import Detector`, imported on first use (it brings in torch and
    transformers, which the command line's light commands do not need)."""
    if name == "Detector":
        from coordexp.detector import Detector

        return Detector
    raise AttributeError(f"module 'coordexp' has no attribute {name!r}")
