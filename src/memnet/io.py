"""Files in and out, in one namespace for users and the napari plugin (``memnet.io.open_input``,
``memnet.io.axes_from_labels``...): inputs live in `memnet.sources`, outputs in `memnet.sinks`."""

from .sinks import *  # noqa: F403
from .sinks import __all__ as _sinks
from .sources import *  # noqa: F403
from .sources import __all__ as _sources

__all__ = [*_sources, *_sinks]
