"""The Export dock widget: a shipped or fine-tuned model as a bioimage.io package (Fiji/deepImageJ,
ilastik, the model zoo), ONNX or TorchScript, through `memnet.export.export_model`. It offers only the
formats whose libraries are installed, and says how to get the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton

from ._models import follow_models, model_choices, model_task
from ._worker import BackgroundJob, ScrollingDock, free_path, status_label

# File name ending of each format (bioimage.io packages are .zip files), in the order they are offered.
SUFFIX = {"bioimageio": ".zip", "onnx": ".onnx", "torchscript": ".pt"}
LABEL = {"bioimageio": "bioimage.io (.zip)", "onnx": "ONNX (.onnx)", "torchscript": "TorchScript (.pt)"}
# What each format needs beyond memnet's own dependencies (bioimage.io: the optional "export" extra).
NEEDS = {"bioimageio": ("bioimageio.spec", "bioimageio.core"), "onnx": ("onnx",), "torchscript": ()}
EXTRA = 'pip install "napari-memnet[export]"'


def format_available(fmt: str) -> bool:
    """Whether ``fmt``'s libraries can be imported (found without importing them: no GUI stall)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in NEEDS[fmt])
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


class ExportWidget(ScrollingDock, Container):
    def __init__(self, napari_viewer=None):
        self.viewer = napari_viewer
        offered = [f for f in SUFFIX if format_available(f)]
        missing = [LABEL[f].split(" ")[0] for f in SUFFIX if f not in offered]
        self._model = ComboBox(label="Model", choices=model_choices)
        self._format = ComboBox(label="Format", choices=[(LABEL[f], f) for f in offered], value=offered[0],
                                tooltip="bioimage.io: a .zip for Fiji/deepImageJ, ilastik and the model zoo "
                                        "(weights, test tensors, cover, model card); ONNX; TorchScript")
        self._hint = status_label()
        self._hint.value = f"{' and '.join(missing)} export: {EXTRA}, then restart napari" if missing else ""
        self._hint.visible = bool(missing)
        self._scale = ComboBox(label="SR scale", choices=[2, 3, 4], value=2, visible=False,
                               tooltip="super-resolution: the factor built into the exported graph")
        self._path = FileEdit(label="Save as", mode="w", filter=f"*{SUFFIX[offered[0]]}")
        self._overwrite = CheckBox(text="Replace existing", value=False)
        self._export_btn = PushButton(text="Export")
        self._status = status_label()
        super().__init__(scrollable=True, widgets=[self._model, self._format, self._hint, self._scale, self._path,
                                                   self._overwrite, self._export_btn, self._status])
        self._model.changed.connect(self._on_model)
        self._format.changed.connect(self._on_format)
        self._export_btn.clicked.connect(self.start)
        self._job = BackgroundJob(self._status, lambda busy: setattr(self._export_btn, "enabled", not busy),
                                  self._explain)
        follow_models(self._model)
        self._on_model(self._model.value)
        self.fit_dock()

    def _on_model(self, name) -> None:
        self._scale.visible = model_task(name) == "sr"

    def _on_format(self, fmt) -> None:
        self._path.filter = f"*{SUFFIX[fmt]}"
        p = Path(str(self._path.value))
        if p.name and p.suffix and p.suffix != SUFFIX[fmt]:
            self._path.value = p.with_suffix(SUFFIX[fmt])

    def _target(self) -> Path | None:
        """The file to write: the name given, with the format's ending added when it has none."""
        path = Path(str(self._path.value or ""))
        if not path.name or path == Path("."):
            return None
        return path if path.suffix else path.with_name(path.name + SUFFIX[self._format.value])

    def start(self):
        from memnet.export import export_model

        fmt = self._format.value
        path = self._target()
        if path is None:
            self._status.value = f"choose where to save the export ({SUFFIX[fmt]})"
            return None
        if path.suffix.lower() != SUFFIX[fmt]:
            self._status.value = f"a {LABEL[fmt].split(' ')[0]} export is a {SUFFIX[fmt]} file: save as " \
                                 f"{path.stem}{SUFFIX[fmt]}"
            return None
        model, overwrite = self._model.value, self._overwrite.value
        if path.exists() and not overwrite:
            self._status.value = self._exists(path)
            return None
        scale = self._scale.value if model_task(model) == "sr" else None

        def call(progress, cancel):
            return export_model(model, path, fmt, scale=scale, overwrite=overwrite)

        return self._job.start(call, self._on_done, message=f"exporting {model} as {LABEL[fmt]}…")

    @staticmethod
    def _exists(path: Path) -> str:
        return f"{path.name} exists: tick 'Replace existing' to replace it, or save as {free_path(path).name}"

    def _explain(self, err: BaseException) -> str | None:
        if isinstance(err, FileExistsError):
            target = self._target()
            return self._exists(target) if target is not None else None
        if isinstance(err, ImportError):  # a library found at start that no longer imports
            return f"this format needs {err.name or 'a missing library'}: {EXTRA}, then restart napari"
        return None

    def _on_done(self, out) -> None:
        size = Path(out).stat().st_size / 1e6
        self._status.value = f"wrote {out} ({size:.1f} MB) in {self._job.elapsed:.1f} s"
