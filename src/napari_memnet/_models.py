"""The model list both widgets offer, and the plugin-wide signal that it changed (a fine-tune saved a
model), so every open widget re-reads it."""

from __future__ import annotations

import warnings
import weakref

from psygnal import Signal

import memnet

from ._backend import loaded, when_loaded

# The plugin is for fluorescence microscopy: its task comes first, so it is what a new layer gets.
TASK_ORDER = ("microscopy", "denoise", "sr", "jpeg")


class _Models:
    changed = Signal()  # emitted on the GUI thread after a model was saved into the user directory


models = _Models()


def model_choices(*_) -> list[tuple[str, str]]:
    """Task names first, microscopy leading (each picks the best installed model), then every model by
    name, microscopy models first. Until memnet's engine is loaded (`_backend`), the first task alone: a
    dock opens at once, and `follow_models` fills in the list."""
    if not loaded():
        return [(f"{TASK_ORDER[0]} (best {TASK_ORDER[0]} model)", TASK_ORDER[0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = memnet.list_models()
    out = []
    order = [t for t in TASK_ORDER if t in memnet.TASKS] + [t for t in memnet.TASKS if t not in TASK_ORDER]
    for task in order:
        if any(m.task == task for m in found):
            out.append((f"{task} (best {task} model)", task))
    for m in sorted(found, key=lambda m: order.index(m.task) if m.task in order else len(order)):
        out.append((f"{m.name}  [{m.task}, {m.source}]", m.name))
    return out


def model_task(name: str) -> str | None:
    if name in TASK_ORDER:  # known without the model list (which needs the engine loaded)
        return name
    if not loaded():
        return None
    if name in memnet.TASKS:
        return name
    for m in memnet.list_models():
        if m.name == name:
            return m.task
    return None


def follow_models(combo) -> None:
    """Re-read ``combo``'s choices (a ComboBox of ``model_choices``) once memnet's engine is loaded and
    whenever ``models.changed`` fires, for as long as the combo box lives. Held weakly: a closed widget is not
    kept alive by the signal."""
    ref = weakref.ref(combo)

    def refresh() -> None:
        w = ref()
        if w is not None:
            try:
                w.reset_choices()
                return
            except RuntimeError:  # its Qt widget was deleted (dock or viewer closed)
                pass
        models.changed.disconnect(refresh)

    models.changed.connect(refresh)
    if not loaded():
        when_loaded(refresh)
