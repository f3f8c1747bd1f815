"""CoordExp: teach vision-language models to detect objects by writing coordinate tokens."""

__version__ = "0.1.0"
