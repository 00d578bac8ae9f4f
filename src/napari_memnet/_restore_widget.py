"""The Restore dock widget: pick a layer and a model, preview one slice, restore the whole stack in
a background thread with progress and Cancel. Calls only memnet's public API."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
    create_widget,
)
from napari.layers import Image
from qtpy.QtCore import QTimer

import memnet

from ._backend import devices, load, loaded, when_loaded
from ._models import follow_models, model_choices, model_task
from ._slices import calibration, current_position, layer_axes
from ._worker import CANCELLED, BackgroundJob, ScrollingDock, free_path, one_line, status_label

WARM_PX = 96  # the image a warm-up restores: small, but it builds the model's backend like a real one
WARM_PLANES = 17  # along Z (else T): as many as the widest context model sees (8 on each side), no more
TILES = (32, 64, 128, 256, 512, 1024, 2048)  # what the tile box offers besides "auto"
DISK_THRESHOLD_BYTES = 1 << 30  # inputs above 1 GiB default to an on-disk Zarr result


def _fmt_eta(p: memnet.Progress) -> str:
    eta = p.eta
    if eta is None:
        return "ETA --"
    return f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}"


def _unless_deleted(call) -> None:
    try:
        call()
    except RuntimeError as e:  # the dock was closed before the event loop ran: nothing to warm up
        if "deleted" not in str(e):
            raise


def _exists(path: Path) -> str:
    return (f"{path.name} exists: tick 'Replace existing' to replace it, or save as {free_path(path).name}")


class RestoreWidget(ScrollingDock, Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        # magicgui's layer picker: napari fills it with the viewer's image layers and, once docked, resets
        # it when layers are added, removed, reordered or renamed.
        self._layer = create_widget(annotation=Image, label="Image")
        self._model = ComboBox(label="Model", choices=model_choices)
        self._scale = ComboBox(label="SR scale", choices=[2, 3, 4], value=2, visible=False)
        self._device = ComboBox(label="Device", choices=["auto", "cpu"], value="auto")  # GPUs: once loaded
        # auto: the tile follows the model's receptive field and the device (memnet.RestoreOptions.tile).
        self._tile = ComboBox(label="Tile (px)", choices=["auto", *TILES], value="auto",
                              tooltip="output tile size; auto sizes it from the model and the device")
        self._mode = RadioButtons(label="Mode", choices=["exact", "blended"], value="exact",
                                  orientation="horizontal",
                                  tooltip="exact: seam-free, equal to whole-image inference; "
                                          "blended: a smaller halo, overlapping tiles blended (faster)")
        self._halo = SpinBox(label="Halo (px)", min=0, max=512, value=16, visible=False)
        self._context = CheckBox(text="Use neighbouring planes (Z/T)", value=True,
                                 tooltip="with a task model (e.g. microscopy) on a stack with enough planes along Z "
                                         "(else T): restore each plane with the context model, which also sees its "
                                         "neighbours; unticked: every plane on its own")
        self._uses = status_label()  # which model a restore of this layer runs
        self._ensemble = CheckBox(text="Self-ensemble (8x slower)", value=False,
                                  tooltip="average the model over the 8 flips/rotations of every tile: "
                                          "a little better, still seam-free")
        self._dest = ComboBox(label="Result", choices=["memory", "zarr on disk"], value="memory")
        self._path = FileEdit(label="Zarr path", mode="w", filter="*.zarr", visible=False)
        self._replace = CheckBox(text="Replace existing", value=False, visible=False,
                                 tooltip="replace a Zarr that exists at this path (only once the new one is complete)")
        self._preview_btn = PushButton(text="Preview current slice")
        self._run_btn = PushButton(text="Restore")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self._status = status_label()
        buttons = Container(layout="horizontal", labels=False,
                            widgets=[self._preview_btn, self._run_btn, self._cancel_btn])
        buttons.margins = (0, 0, 0, 0)
        # Scrollable: the dock can be shorter than its contents, so three docks fit a 1000 px screen.
        super().__init__(scrollable=True, widgets=[
            self._layer, self._model, self._uses, self._context, self._scale, self._device, self._tile, self._mode,
            self._halo, self._ensemble, self._dest, self._path, self._replace, buttons, self._progress, self._status,
        ])
        self._model.changed.connect(self._on_model)
        self._mode.changed.connect(lambda v: setattr(self._halo, "visible", v == "blended"))
        self._dest.changed.connect(self._on_dest)
        self._layer.changed.connect(self._on_layer)
        for w in (self._layer, self._model, self._context):
            w.changed.connect(self._show_model)
        self._run_btn.clicked.connect(lambda: self.start(preview=False))
        self._preview_btn.clicked.connect(lambda: self.start(preview=True))
        self._cancel_btn.clicked.connect(self.cancel)
        self._job = BackgroundJob(self._status, self._set_busy, self._explain)
        follow_models(self._model)  # a fine-tune that publishes a model adds it here
        self._on_model(self._model.value)
        self._on_layer(self._layer.value)
        self._show_model()
        self.fit_dock()
        self._warming: threading.Thread | None = None
        self._warmed: set[tuple] = set()  # what was warmed up (or is being warmed up): see _warm_input
        # what a restore of the chosen layer runs (the 2-D model, or a context model on a stack) is warmed up
        for w in (self._model, self._device, self._layer, self._context):
            w.changed.connect(self.warm_up)
        # once the dock is built and drawn (a warm-up running meanwhile would slow that down: the GIL)
        QTimer.singleShot(0, lambda: _unless_deleted(self.warm_up))
        when_loaded(self._on_loaded, self._job._on_error)

    # Choices ------------------------------------------------------------------------------------
    def _on_loaded(self) -> None:
        """memnet's engine is loaded (`_backend`): offer the GPUs, say which model the layer gets."""
        gpus = [d for d in devices() if d.startswith("cuda:")]
        if gpus:
            self._device.choices = ["auto", "cpu", *gpus]
        self._on_model(self._model.value)
        self._show_model()

    def refresh_models(self) -> None:
        """Re-read the model list (e.g. after a fine-tune saved a new model)."""
        self._model.reset_choices()

    def warm_up(self, *_) -> threading.Thread | None:
        """Prepare, in the background, the model a restore of the chosen layer runs on the chosen device (load
        memnet's engine and the weights, build the inference backend: most of a first preview's time), so the
        first preview is as fast as the next: the 2-D model, or on a stack the context model that replaces it.
        A preview joins it rather than doing it again. Best effort: a failure shows when the user runs the
        model."""
        model, device, context = self._model.value, self._device.value, self._context_option()
        if not model:
            return None
        data, axes, lead = self._warm_input()
        key = (model, device, context, axes, data.shape)
        if key in self._warmed:
            return None
        self._warmed.add(key)
        scale = {"scale": 2} if model_task(model) == "sr" else {}  # one backend serves every factor
        before = self._warming

        def run():
            if before is not None:
                before.join()  # one at a time: they share the CPU, and a preview waits for the last one
            try:
                load()
                if lead:
                    memnet.restore_plane(data, model, lead, axes=axes, device=device, context=context, **scale)
                else:
                    memnet.restore(data, model, axes=axes, device=device, **scale)
            except Exception:  # reported by the real run, in the widget's words
                pass

        # not a daemon: quitting napari waits for it rather than tearing torch down under it (an abort)
        self._warming = threading.Thread(target=run, name="memnet-warm-up", daemon=False)
        self._warming.start()
        return self._warming

    def _warm_input(self) -> tuple[np.ndarray, str, tuple]:
        """(data, axes, lead) for a warm-up: a stand-in for the chosen layer with its axes, WARM_PX planes, up to
        WARM_PLANES along Z (else T) and one along any other axis, so memnet picks the model it would pick for
        the layer; lead: the plane to restore (a middle one), empty for a single plane."""
        layer = self._layer.value
        plane = (np.zeros((WARM_PX, WARM_PX), np.float32), "YX", ())
        if layer is None or getattr(layer, "rgb", False):
            return plane
        data = layer.data[0] if layer.multiscale else layer.data
        shape = data.shape
        try:
            axes = layer_axes(layer) or memnet.open_input(data).axes
        except ValueError:
            return plane
        if len(axes) != len(shape) or sorted(axes[-2:]) != ["X", "Y"] or len(axes) == 2:
            return plane
        along = "Z" if "Z" in axes else "T" if "T" in axes else None
        warm = [WARM_PX if a in "YX" else min(n, WARM_PLANES) if a == along else 1 for a, n in zip(axes, shape)]
        lead = tuple(n // 2 for a, n in zip(axes, warm) if a not in "YX")
        return np.zeros(warm, np.float32), axes, lead

    def _on_model(self, name) -> None:
        self._scale.visible = bool(name) and model_task(name) == "sr"

    def _show_model(self, *_) -> None:
        """Say which model a restore of the chosen layer runs (a context model on a stack, or the 2-D one)."""
        layer, model = self._layer.value, self._model.value
        if layer is None or not model:
            self._uses.value = ""
            return
        if not loaded():  # _on_loaded says it
            self._uses.value = "loading memnet…"
            return
        data = layer.data[0] if layer.multiscale else layer.data
        try:
            axes = layer_axes(layer) or memnet.open_input(data).axes
            self._uses.value = "uses " + memnet.describe_model(data, model, axes=axes, context=self._context_option())
        except (ValueError, LookupError) as e:
            self._uses.value = one_line(str(e))

    def _context_option(self) -> str:
        return "auto" if self._context.value else "off"

    def _on_dest(self, dest) -> None:
        self._path.visible = self._replace.visible = dest == "zarr on disk"

    def _on_layer(self, layer) -> None:
        if layer is None:
            return
        data = layer.data[0] if layer.multiscale else layer.data
        nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
        self._dest.value = "zarr on disk" if nbytes > DISK_THRESHOLD_BYTES else "memory"

    # Running ------------------------------------------------------------------------------------
    def _options(self) -> dict:
        """The memnet.RestoreOptions fields this widget sets (the others keep their defaults)."""
        opts = {"tile": self._tile.value, "device": self._device.value, "context": self._context_option(),
                "halo": "exact" if self._mode.value == "exact" else int(self._halo.value)}
        if self._ensemble.value:
            opts["ensemble"] = True
        if self._model.value and model_task(self._model.value) == "sr":
            opts["scale"] = int(self._scale.value)
        return opts

    def start(self, preview: bool = False):
        """Start a restore (or a preview of the displayed slice) in a background thread."""
        layer, model = self._layer.value, self._model.value
        if layer is None:
            self._status.value = "no image layer: open an image first"
            return None
        if not model:
            self._status.value = "no model installed: see `memnet models`"
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        try:  # the layer's axis letters, else memnet's default for its shape (what restore would assume)
            axes = layer_axes(layer) or memnet.open_input(data).axes
        except ValueError as e:
            self._status.value = one_line(str(e))
            return None
        calib = calibration(layer, axes)  # the results carry the layer's pixel size, origin and units
        opts = self._options()
        output = where = None
        lead = None
        if preview:  # the plane's pixels as the full restore gives them (each channel's mapping from the stack)
            lead, where = current_position(self.viewer, layer, data.shape, layer_axes(layer))
        elif self._dest.value == "zarr on disk":
            output = Path(str(self._path.value)) if str(self._path.value) not in ("", ".") else \
                Path(tempfile.mkdtemp(prefix="memnet-")) / f"{layer.name}-restored.zarr"
            if output.exists() and not self._replace.value:
                self._status.value = _exists(output)
                return None
        overwrite = output is not None and self._replace.value
        self._progress.value = 0
        self.warm_up()  # started now if it was not yet (clicked before the event loop ran)
        warming = self._warming

        def run(progress, cancel):
            if warming is not None:
                warming.join()  # the model is being prepared: wait for it rather than prepare it twice
            if lead is not None:
                return memnet.restore_plane(data, model, lead, axes=axes, progress=progress, cancel=cancel, **opts)
            return memnet.restore(data, model, axes=axes, output=output, progress=progress, cancel=cancel,
                                  overwrite=overwrite, **calib, **opts)

        return self._job.start(
            run,
            lambda res: self._on_done(layer, model, res, opts, preview, output, where),
            on_progress=self._on_progress, message="previewing…" if preview else "restoring…")

    def _explain(self, err: BaseException) -> str | None:
        """An expected error in this widget's words (None: the error's own first line)."""
        path = Path(str(getattr(err, "filename", None) or self._path.value))
        if isinstance(err, memnet.OutputLocked):
            return f"another run is writing {path.name}: wait for it to end, or choose another Zarr path"
        if isinstance(err, FileExistsError):
            return _exists(path)
        return None

    def cancel(self) -> None:
        self._job.cancel()

    def _on_progress(self, p: memnet.Progress) -> None:
        self._progress.value = int(100 * p.fraction)
        self._status.value = f"{p.done}/{p.total} tiles  {p.mpx_per_s:.2f} Mpx/s  {_fmt_eta(p)}"

    def _on_done(self, layer, model, result, opts, preview, output, where) -> None:
        if result is CANCELLED:
            self._progress.value = 0
            self._status.value = "cancelled: no layer was added"
            return
        s = opts.get("scale", 1)
        axes = layer_axes(layer) or ("Q" * (layer.ndim - 2) + "YX")
        keys = [a if a in "YX" else str(d) for d, a in enumerate(axes)]  # unique keys, Y/X by letter
        sc, tr = memnet.upscaled_geometry(dict(zip(keys, layer.scale)), dict(zip(keys, layer.translate)), s)
        scale, translate = [sc[k] for k in keys], [tr[k] for k in keys]
        kw = {"scale": scale, "translate": translate, "axis_labels": layer.axis_labels,
              "units": layer.units, "metadata": {**layer.metadata, "memnet_model": model, "memnet_options": opts},
              "colormap": layer.colormap.name, "blending": layer.blending}
        if preview:
            keep = [d for d, a in enumerate(axes) if a in "YX"]
            kw = {**kw, "scale": [scale[d] for d in keep], "translate": [translate[d] for d in keep],
                  "axis_labels": [layer.axis_labels[d] for d in keep], "units": [layer.units[d] for d in keep]}
            name = f"{layer.name} [{model}] preview"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.viewer.add_image(result, name=name, **kw)
            self._status.value = f"preview of {where or 'the image'} done in {self._job.elapsed:.1f} s"
            return
        if output is not None:  # the on-disk result with its pyramid: napari shows the level that fits the view
            import dask.array as da

            n = memnet.open_input(output).n_levels
            levels = [result] + [memnet.open_input(output, level=k).array for k in range(1, n)]
            result = [da.from_array(a, chunks=a.chunks) for a in levels]
            kw["multiscale"] = n > 1
            result = result if n > 1 else result[0]
        self.viewer.add_image(result, name=f"{layer.name} [{model}]", **kw)
        where_to = f" → {output}" if output is not None else ""
        self._status.value = f"done in {self._job.elapsed:.1f} s{where_to}"
        self._progress.value = 100

    def _set_busy(self, busy: bool) -> None:
        self._run_btn.enabled = self._preview_btn.enabled = not busy
        self._cancel_btn.enabled = busy
