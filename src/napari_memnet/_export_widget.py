"""The Export dock widget: a shipped or fine-tuned model as a bioimage.io package (Fiji/deepImageJ,
ilastik, the model zoo), ONNX or TorchScript, through `memnet.export.export_model`."""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton

from ._models import follow_models, model_choices, model_task
from ._worker import BackgroundJob, status_label

# File name ending of each format (bioimage.io packages are .zip files).
SUFFIX = {"bioimageio": ".zip", "onnx": ".onnx", "torchscript": ".pt"}


class ExportWidget(Container):
    def __init__(self, napari_viewer=None):
        self.viewer = napari_viewer
        self._model = ComboBox(label="Model", choices=model_choices)
        self._format = ComboBox(label="Format", choices=list(SUFFIX), value="bioimageio",
                                tooltip="bioimageio: a .zip for Fiji/deepImageJ, ilastik and the model zoo "
                                        "(weights, test tensors, cover, model card); onnx; torchscript")
        self._scale = ComboBox(label="SR scale", choices=[2, 3, 4], value=2, visible=False,
                               tooltip="super-resolution: the factor built into the exported graph")
        self._path = FileEdit(label="Save as", mode="w", filter="*.zip")
        self._overwrite = CheckBox(text="Replace an existing file", value=False)
        self._export_btn = PushButton(text="Export")
        self._status = status_label()
        super().__init__(widgets=[self._model, self._format, self._scale, self._path, self._overwrite,
                                  self._export_btn, self._status])
        self._model.changed.connect(self._on_model)
        self._format.changed.connect(self._on_format)
        self._export_btn.clicked.connect(self.start)
        self._job = BackgroundJob(self._status, lambda busy: setattr(self._export_btn, "enabled", not busy))
        follow_models(self._model)
        self._on_model(self._model.value)

    def _on_model(self, name) -> None:
        self._scale.visible = model_task(name) == "sr"

    def _on_format(self, fmt) -> None:
        self._path.filter = f"*{SUFFIX[fmt]}"
        p = Path(str(self._path.value))
        if p.name and p.suffix and p.suffix != SUFFIX[fmt]:
            self._path.value = p.with_suffix(SUFFIX[fmt])

    def start(self):
        from memnet.export import export_model

        path = Path(str(self._path.value or ""))
        if not path.name or path == Path("."):
            self._status.value = f"choose where to save the export ({SUFFIX[self._format.value]})"
            return None
        model, fmt, overwrite = self._model.value, self._format.value, self._overwrite.value
        if path.exists() and not overwrite:
            self._status.value = f"{path.name} exists: choose another name, or tick 'Replace an existing file'"
            return None
        scale = self._scale.value if model_task(model) == "sr" else None

        def call(progress, cancel):
            return export_model(model, path, fmt, scale=scale, overwrite=overwrite)

        return self._job.start(call, self._on_done, message=f"exporting {model} as {fmt}…")

    def _on_done(self, out) -> None:
        size = Path(out).stat().st_size / 1e6
        self._status.value = f"wrote {out} ({size:.1f} MB) in {self._job.elapsed:.1f} s"
