"""napari plugin for MemNet restoration. Calls only the public API of the `memnet` core."""

from memnet import __version__

__all__ = ["__version__"]
