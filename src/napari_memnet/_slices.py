"""A layer's axes and the 2-D slice a viewer shows, shared by the Restore preview and the Fine-tune
before/after."""

from __future__ import annotations

import numpy as np

import memnet


def layer_axes(layer) -> str | None:
    """The layer's axis letters (TCZYX): from the reader's metadata, else from its axis labels."""
    axes = (layer.metadata or {}).get("memnet_axes")
    if axes and len(axes) == layer.ndim:
        return axes
    return memnet.io.axes_from_labels(getattr(layer, "axis_labels", ()), layer.ndim)


def current_slice(viewer, layer, data, axes: str | None):
    """(plane, its axes, where) for ``layer``: every non-YX axis at the viewer's current position."""
    axes = axes or ("Q" * (layer.ndim - 2) + "YX")
    world = [viewer.dims.point[-layer.ndim:][d] for d in range(layer.ndim)]
    idx, where = [], []
    for d, a in enumerate(axes):
        if a in "YX":
            idx.append(slice(None))
        else:
            i = int(np.clip(round((world[d] - layer.translate[d]) / layer.scale[d]), 0, data.shape[d] - 1))
            idx.append(i)
            where.append(f"{a.lower()}={i}")
    return np.asarray(data[tuple(idx)]), "".join(a for a in axes if a in "YX"), ", ".join(where)


def plane_geometry(layer, axes: str | None) -> dict:
    """Scale, translate, labels and units of the layer's YX plane, for a 2-D layer added beside it."""
    axes = axes or ("Q" * (layer.ndim - 2) + "YX")
    keep = [d for d, a in enumerate(axes) if a in "YX"]
    return {"scale": [layer.scale[d] for d in keep], "translate": [layer.translate[d] for d in keep],
            "axis_labels": [layer.axis_labels[d] for d in keep], "units": [layer.units[d] for d in keep]}
