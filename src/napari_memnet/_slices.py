"""A layer's axes and the 2-D slice a viewer shows, shared by the Restore preview and the Fine-tune
before/after."""

from __future__ import annotations

import numpy as np

import memnet
import memnet.io  # noqa: F401 (here, on the GUI thread, before a background load can compete for the GIL)


def layer_axes(layer) -> str | None:
    """The layer's axis letters (TCZYX): from the reader's metadata, else from its axis labels."""
    axes = (layer.metadata or {}).get("memnet_axes")
    if axes and len(axes) == layer.ndim:
        return axes
    return memnet.io.axes_from_labels(getattr(layer, "axis_labels", ()), layer.ndim)


def calibration(layer, axes: str) -> dict:
    """``memnet.restore``'s pixel_size / units / translate from the layer's scale, units and translate
    (``axes``: the letters the data are restored with), so every result carries the layer's geometry."""
    units = {a: str(u) for a, u in zip(axes, layer.units) if str(u) not in ("pixel", "None", "")}
    return {"pixel_size": {a: float(s) for a, s in zip(axes, layer.scale)}, "units": units,
            "translate": {a: float(t) for a, t in zip(axes, layer.translate)}}


def current_position(viewer, layer, shape, axes: str | None) -> tuple[tuple, str]:
    """(lead, where) for ``layer``: the index of the plane the viewer shows over every non-YX axis (as
    `memnet.Source.leads` orders them), and its name ("z=3" when the layer says what its axes are, else
    "plane 3 of axis 0")."""
    named = axes is not None
    axes = axes or ("Q" * (layer.ndim - 2) + "YX")
    world = [viewer.dims.point[-layer.ndim:][d] for d in range(layer.ndim)]
    lead, where = [], []
    for d, a in enumerate(axes):
        if a not in "YX":
            i = int(np.clip(round((world[d] - layer.translate[d]) / layer.scale[d]), 0, shape[d] - 1))
            lead.append(i)
            where.append(f"{a.lower()}={i}" if named else f"plane {i} of axis {d}")
    return tuple(lead), ", ".join(where)


def current_slice(viewer, layer, data, axes: str | None):
    """(plane, its axes, where) for ``layer``: every non-YX axis at the viewer's current position."""
    lead, where = current_position(viewer, layer, data.shape, axes)
    axes = axes or ("Q" * (layer.ndim - 2) + "YX")
    it = iter(lead)
    idx = tuple(slice(None) if a in "YX" else next(it) for a in axes)
    return np.asarray(data[idx]), "".join(a for a in axes if a in "YX"), where


def plane_geometry(layer, axes: str | None) -> dict:
    """Scale, translate, labels and units of the layer's YX plane, for a 2-D layer added beside it."""
    axes = axes or ("Q" * (layer.ndim - 2) + "YX")
    keep = [d for d, a in enumerate(axes) if a in "YX"]
    return {"scale": [layer.scale[d] for d in keep], "translate": [layer.translate[d] for d in keep],
            "axis_labels": [layer.axis_labels[d] for d in keep], "units": [layer.units[d] for d in keep]}
