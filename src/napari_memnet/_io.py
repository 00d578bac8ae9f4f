"""Reader (TIFF / Zarr / OME-Zarr as lazy dask layers) and writer (OME-Zarr, TIFF) for napari.
Both go through memnet's public I/O, so files read here and restored by the CLI agree."""

from __future__ import annotations

from pathlib import Path

import memnet


def _is_ours(path: str) -> bool:
    return memnet.io.input_format(path) is not None or (Path(path) / ".zattrs").exists()


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str) or not _is_ours(path):
        return None
    return read_layers


def layer_kwargs(src: memnet.Source, name: str) -> dict:
    """napari layer metadata from an opened input: scale, translate, axis labels, units."""
    axes = src.axes
    kw = {
        "name": name,
        "scale": tuple(float(src.scale.get(a, 1.0)) for a in axes),
        "translate": tuple(float(src.translate.get(a, 0.0)) for a in axes),
        "axis_labels": tuple(a.lower() for a in axes),
        "metadata": {"memnet_axes": axes, "source": str(src.path) if src.path else None},
    }
    units = [src.units.get(a) for a in axes]
    if any(units):
        kw["units"] = tuple(memnet.io.ngff_unit(u) if u else "pixel" for u in units)
    return kw


def read_layers(path):
    import warnings

    import dask.array as da

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several series: each becomes its own layer below
        first = memnet.open_input(path)
    name = Path(path).name.split(".")[0]
    layers = []
    for i in range(first.n_series):
        src = first if i == 0 else memnet.open_input(path, series=i)
        lock = src.path is not None and memnet.io.input_format(src.path) == "tiff"
        # A multiscale OME-Zarr: every level, so napari shows the one that fits the view.
        levels = [src.array] + [memnet.open_input(path, level=k).array for k in range(1, src.n_levels)]
        data = [da.from_array(a, chunks=getattr(a, "chunks", None) or "auto", lock=lock) for a in levels]
        kw = layer_kwargs(src, name if first.n_series == 1 else f"{name} [series {i}]")
        kw["metadata"]["memnet_series"] = i
        if len(data) > 1:
            kw["multiscale"] = True
        layers.append((data if len(data) > 1 else data[0], kw, "image"))
    return layers


def write_image(path: str, data, meta: dict) -> list[str]:
    """Write one image layer to OME-Zarr (.zarr) or OME-TIFF (.tif), keeping scale and axis labels."""
    if meta.get("multiscale"):  # its full resolution; a .zarr gets its pyramid anew
        data = data[0]
    labels = meta.get("axis_labels")
    ndim = getattr(data, "ndim", len(getattr(data, "shape", ())))
    axes = meta.get("metadata", {}).get("memnet_axes")
    if not axes or len(axes) != ndim:
        axes = memnet.io.axes_from_labels(labels, ndim)
    src = memnet.open_input(data, axes=axes)
    scale = dict(zip(src.axes, meta.get("scale", [1.0] * ndim)))
    translate = dict(zip(src.axes, meta.get("translate", [0.0] * ndim)))
    units = {a: str(u) for a, u in zip(src.axes, meta.get("units") or []) if str(u) not in ("pixel", "None")}
    source = (meta.get("metadata") or {}).get("source")
    memnet.check_output_path(path, [source])  # never the layer's own source, nor inside or around it
    memnet.save_image(data, path, axes=src.axes, scale=scale, units=units, translate=translate, overwrite=True)
    return [str(path)]
