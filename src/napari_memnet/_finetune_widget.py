"""The Fine-tune dock widget: adapt a model to the user's own layers (the modes of
``memnet.finetune_modes``, self-supervised ones first) within a budget in minutes, in a background thread,
with a live loss / held-out score plot; afterwards a before/after preview of the current slice. The
result appears in Restore (only when it beat the starting model on held-out data)."""

from __future__ import annotations

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.layers import Image
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

import memnet
from memnet.finetune_modes import AUTO, MODES, FinetuneConfig, self_supervised_modes
from memnet.train_options import default

from ._backend import when_loaded
from ._models import follow_models, model_choices, models
from ._slices import current_slice, layer_axes, plane_geometry
from ._worker import CANCELLED, BackgroundJob, ScrollingDock, one_line, status_label

_SECOND_LABEL = {"target": "Clean layer", "noisy2": "Second noisy layer"}
_NEEDS_SECOND = {n: _SECOND_LABEL[m.needs] for n, m in MODES.items() if m.needs}
# What a user with one noisy layer can run comes first; the default is the first of them.
# auto first (the CLI's default): nbr2nbr, or n2v-corr / structn2v where the noise is correlated between neighbours
_MODE_ORDER = [AUTO] + self_supervised_modes() + [n for n in MODES if n not in self_supervised_modes()]
_MODE_HELP = {AUTO: "nbr2nbr, or where the noise check finds noise correlated between neighbouring pixels "
              "n2v-corr (weakly) or structn2v (strongly)", **{n: m.help for n, m in MODES.items()}}


DEFAULT_NAME = "my-finetuned"


def model_exists(name: str) -> bool:
    """Whether a user model of this name exists (a fine-tune would replace it)."""
    return (memnet.user_model_dir() / f"{name}.safetensors").exists()


def free_model_name(name: str) -> str:
    """``name`` if no user model has it, else the first free "name-2", "name-3"..."""
    if not model_exists(name):
        return name
    k = 2
    while model_exists(f"{name}-{k}"):
        k += 1
    return f"{name}-{k}"


class _NotPublished:
    """The run ended without beating the starting model, or refused the data (returned, not raised: a
    worker that returns an exception is reported as failed). ``message``: in the widget's words."""

    def __init__(self, message: str, decision=None):
        self.message, self.decision = message, decision  # decision: the held-out paired test, when one ran


class LossPlot(QWidget):
    """Training loss (log scale, orange) and the held-out score (blue) against the step."""

    def __init__(self):
        super().__init__()
        self.history: list[tuple[float, float, float]] = []
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def set_history(self, history) -> None:
        self.history = [tuple(map(float, h)) for h in history]
        self.update()

    def paintEvent(self, _event):  # noqa: N802 (Qt API)
        import math

        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        w, h, m, mr = self.width(), self.height(), 28, 48  # right margin fits "xx.x dB" labels
        p.fillRect(self.rect(), QColor(38, 41, 48))
        p.setPen(QColor(200, 200, 200))
        p.drawText(m, 14, "loss (orange, log)   held-out score (blue, dB)")
        if len(self.history) < 1:
            p.drawText(m, h // 2, "the plot fills in at each validation")
            return
        steps = [s for s, _, _ in self.history]
        s0, s1 = min(steps), max(steps)
        s1 = s1 if s1 > s0 else s0 + 1

        def series(values, color, label_fmt, side):
            lo, hi = min(values), max(values)
            hi = hi if hi > lo else lo + 1e-9
            pts = QPolygonF([QPointF(m + 8 + (s - s0) / (s1 - s0) * (w - m - mr - 16),
                                     h - m - (v - lo) / (hi - lo) * (h - 2 * m - 10)) for s, v in zip(steps, values)])
            p.setPen(QPen(color, 2))
            p.drawPolyline(pts)
            for pt in pts:
                p.drawEllipse(pt, 2.5, 2.5)
            p.setPen(color)
            x = 2 if side == "left" else w - mr + 4
            p.drawText(x, h - m + 12, label_fmt(lo))  # below/above the extreme points, not on them
            p.drawText(x, m + 2, label_fmt(hi))

        series([math.log10(max(v, 1e-12)) for _, v, _ in self.history], QColor(255, 160, 60),
               lambda v: f"{10 ** v:.0e}", "left")
        series([v for _, _, v in self.history], QColor(90, 170, 255), lambda v: f"{v:.1f}", "right")
        p.setPen(QColor(200, 200, 200))
        p.drawText(m, h - 6, f"step {int(s0)}")
        p.drawText(w - mr - 60, h - 6, f"step {int(s1)}")
        p.end()


class FinetuneWidget(ScrollingDock, Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        # magicgui's layer pickers: napari keeps them in step with the viewer's image layers once docked.
        self._noisy = create_widget(annotation=Image, label="Noisy layer")
        self._mode = ComboBox(label="Mode", choices=_MODE_ORDER, value=_MODE_ORDER[0],
                              tooltip="\n".join(f"{n}: {_MODE_HELP[n]}" for n in _MODE_ORDER))
        self._second = create_widget(annotation=Image, label="Clean layer", options={"visible": False})
        self._model = ComboBox(label="Start from", choices=model_choices)
        self._name = LineEdit(label="Save as", value=DEFAULT_NAME)  # made free once memnet is loaded
        self._replace = CheckBox(text="Replace existing model", value=False,
                                 tooltip="replace a fine-tuned model of this name (only if the new one is saved)")
        self._minutes = FloatSpinBox(label="Budget (minutes)", min=0.5, max=600, step=0.5,
                                     value=default(FinetuneConfig, "minutes"),
                                     tooltip="the run stops after this time (or earlier, when it stops improving)")
        self._steps = SpinBox(label="Max steps (0: none)", min=0, max=100_000, step=50, value=0)
        self._patch = SpinBox(label="Patch", min=16, max=256, step=8, value=default(FinetuneConfig, "patch"))
        self._val = FloatSpinBox(label="Validation fraction", min=0.05, max=0.5, step=0.05,
                                 value=default(FinetuneConfig, "val_fraction"))
        self._start_btn = PushButton(text="Start")
        self._stop_btn = PushButton(text="Stop", enabled=False)
        self._compare_btn = PushButton(text="Before / after on current slice", enabled=False,
                                       tooltip="restore the slice on screen with the starting model and the new one")
        self._progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self._status = status_label()
        self.plot = LossPlot()
        buttons = Container(layout="horizontal", labels=False, widgets=[self._start_btn, self._stop_btn])
        buttons.margins = (0, 0, 0, 0)
        # Scrollable: the dock can be shorter than its contents, so three docks fit a 1000 px screen.
        super().__init__(scrollable=True, widgets=[
            self._noisy, self._mode, self._second, self._model, self._name, self._replace, self._minutes,
            self._steps, self._patch, self._val, buttons, self._progress, self._status, self._compare_btn])
        self.contents.layout().addWidget(self.plot)
        self.fit_dock()
        self._mode.changed.connect(self._on_mode)
        self._start_btn.clicked.connect(self.start)
        self._stop_btn.clicked.connect(self.stop)
        self._compare_btn.clicked.connect(self.compare)
        self._job = BackgroundJob(self._status, self._set_busy, self._explain)
        follow_models(self._model)  # "Start from" offers what this or another fine-tune published
        when_loaded(self._free_default_name)  # the user model folder is memnet's zoo: torch, not on the GUI thread
        self.saved_path = None
        self._last = None  # the run's last FinetuneProgress: its scores make the end message
        self._trained: tuple | None = None  # (layer, base model, new model) of the last published run

    def _free_default_name(self) -> None:
        if self._name.value == DEFAULT_NAME:  # unless the user typed a name meanwhile
            self._name.value = free_model_name(DEFAULT_NAME)

    def _on_mode(self, mode) -> None:
        self._second.visible = mode in _NEEDS_SECOND
        if mode in _NEEDS_SECOND:
            self._second.label = _NEEDS_SECOND[mode]

    def start(self):
        from memnet.finetune import NoiseCorrelated, NotImproved, finetune

        noisy = self._noisy.value
        if noisy is None:
            self._status.value = "no image layer: open your noisy data first"
            return None
        mode = self._mode.value
        second = self._second.value if mode in _NEEDS_SECOND else None
        if mode in _NEEDS_SECOND and (second is None or second is noisy):
            self._status.value = f"mode {mode} needs a {_NEEDS_SECOND[mode].lower()} (a different layer)"
            return None
        name = self._name.value.strip()
        if not name:
            self._status.value = "name the new model (Save as)"
            return None
        if name == self._model.value:
            self._status.value = f"save the new model under another name than {name!r}, the model it starts from"
            return None
        if model_exists(name) and not self._replace.value:
            self._status.value = self._exists(name)
            return None
        steps = int(self._steps.value) or None
        try:  # a value the config refuses (a bad name...) is one line here, like any other mistake
            cfg = FinetuneConfig(model=self._model.value, mode=mode, name=name, overwrite=bool(self._replace.value),
                                 minutes=float(self._minutes.value), steps=steps, patch=int(self._patch.value),
                                 val_fraction=float(self._val.value),
                                 val_every=max(10, steps // 20) if steps else 25, axes=layer_axes(noisy))
        except (ValueError, TypeError) as e:
            self._status.value = one_line(str(e))
            return None
        data = noisy.data[0] if noisy.multiscale else noisy.data
        other = None if second is None else (second.data[0] if second.multiscale else second.data)

        def run(progress, cancel):
            try:
                return finetune(cfg, data, target=other if mode == "paired" else None,
                                noisy2=other if mode == "n2n" else None, progress=progress, cancel=cancel,
                                log=progress)  # what runs before the first step shows in the status line
            except NoiseCorrelated:
                return _NotPublished(f"not fine-tuned: the noise in this layer is correlated between neighbouring "
                                     f"pixels, which mode {mode} would learn as signal: use mode adjacent on a stack, "
                                     "or paired / n2n with a second layer")
            except NotImproved as e:  # a normal outcome, not an error: the starting model stays the better one
                return _NotPublished(str(e), e.decision)

        self._compare_btn.enabled = False
        self._last = None
        self._progress.value = 0
        self.plot.set_history([])
        return self._job.start(run, lambda res: self._on_done(res, noisy, cfg.model, name),
                               on_progress=self._on_progress,
                               message=f"fine-tuning {cfg.model} ({mode}) for up to {cfg.minutes:g} min: starting…")

    @staticmethod
    def _exists(name: str) -> str:
        return (f"a model named {name!r} exists: tick 'Replace existing model' to replace it, or save as "
                f"{free_model_name(name)!r}")

    def _explain(self, err: BaseException) -> str | None:
        if isinstance(err, FileExistsError) and "user model" in str(err):
            return self._exists(self._name.value.strip())
        return None

    def _not_published(self, message: str, base: str, decision=None) -> str:
        """Why nothing was saved, with the scores when there were any (on the GUI thread, after the last
        progress report) and the publish test's figures ("kept the starting model: gain +0.004 ± 0.010 dB")."""
        p = self._last
        test = f" ({decision.summary()})" if decision is not None else ""
        if message.startswith("not published") and p is not None and p.history and p.baseline is not None:
            best = max(h[2] for h in p.history)
            return (f"not published: held-out score {p.baseline:.2f} → {best:.2f} dB did not clearly beat {base}"
                    f"{test}; try another mode, more data or more time")
        return one_line(message).split(". Try")[0] + test

    def stop(self) -> None:
        self._job.cancel("stopping…")

    def _on_progress(self, p) -> None:
        budget = 60 * float(self._minutes.value)
        if isinstance(p, str):  # a stage before (or between) the steps: reading, noise check, scoring...
            if self._last is None:  # once steps run, the step line says more
                self._status.value = one_line(p)
                self._progress.value = int(100 * min(0.99, self._job.elapsed / budget))
            return
        self._last = p
        fractions = [p.step / p.total if p.total else 0.0, p.elapsed / p.budget_s if p.budget_s else 0.0]
        self._progress.value = int(100 * min(1.0, max(fractions)))
        val = f"  held-out {p.history[-1][2]:.2f} dB" if p.history else ""
        base = f" (start {p.baseline:.2f})" if p.baseline is not None and p.history else ""
        self._status.value = f"step {p.step}  {p.elapsed / 60:.1f} min  loss {p.loss:.4g}{val}{base}"
        if p.val_psnr is not None:
            self.plot.set_history(p.history)

    def _on_done(self, result, layer, base, name) -> None:
        models.changed.emit()  # even when stopped: the best model so far may have been saved
        if result is CANCELLED:
            self._progress.value = 0
            saved = model_exists(name) and self._last is not None and self._last.history
            self._status.value = (f"stopped; the model so far is saved as {name!r}" if saved else
                                  "stopped before a model beat the starting one: nothing saved")
            self._next_name(name)
            return
        self._progress.value = 100
        if isinstance(result, _NotPublished):
            self._status.value = self._not_published(result.message, base, result.decision)
            return
        self.saved_path = result
        self._trained = (layer, base, name)
        self._compare_btn.enabled = True
        p = self._last
        scores = (f"held-out score {p.baseline:.2f} → {max(h[2] for h in p.history):.2f} dB, "
                  if p is not None and p.history and p.baseline is not None else "")
        decision = getattr(result, "decision", None)  # the paired test across held-out crops
        scores += f"{decision.summary()}, " if decision is not None else ""
        self._status.value = f"{scores}saved as {name!r} in {self._job.elapsed:.0f} s: pick it in Restore"
        self._next_name(name)

    def _next_name(self, used: str) -> None:
        """After a run saved ``used``: the name box offers a free name, so the next run adds a model."""
        if self._name.value.strip() == used and model_exists(used):
            self._name.value = free_model_name(used)

    def compare(self):
        """Restore the slice on screen with the starting and the new model; add both as layers."""
        if self._trained is None:
            return None
        import memnet

        layer, base, new = self._trained
        if layer not in self.viewer.layers:
            self._status.value = f"layer {layer.name!r} is gone: nothing to compare on"
            return None
        axes = layer_axes(layer)
        data = layer.data[0] if layer.multiscale else layer.data
        plane, plane_axes, where = current_slice(self.viewer, layer, data, axes)

        def run(progress, cancel):
            return [memnet.restore(plane, m, axes=plane_axes, cancel=cancel) for m in (base, new)]

        # busy=False: a short job on one slice; Start and Stop keep their state.
        return self._job.start(run, lambda res: self._show_comparison(layer, axes, (base, new), res, where),
                               message=f"restoring {where or 'the image'} with {base} and {new}…", busy=False)

    def _show_comparison(self, layer, axes, names, results, where) -> None:
        geometry = plane_geometry(layer, axes)
        for label, model, img in zip(("before", "after"), names, results):
            name = f"{layer.name} [{model}] {label}"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.viewer.add_image(img, name=name, colormap=layer.colormap.name, **geometry)
        self._status.value = f"before/after on {where or 'the image'}: toggle the two layers to compare"

    def _set_busy(self, busy: bool) -> None:
        self._start_btn.enabled, self._stop_btn.enabled = not busy, busy
