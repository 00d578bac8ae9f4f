"""napari-memnet core: MemNet image restoration, tiled and out of core. No Qt, no napari."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-memnet")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from .model import (
    CONFIGS,
    MemNet,
    MemNetConfig,
    conv_weight_count,
    deepen,
    macs_per_pixel,
    receptive_field,
    self_ensemble,
    widen,
)
from .zoo import TASKS, ModelFileError, ModelInfo, list_models, load_model, save_model, user_model_dir

__all__ = [
    "__version__",
    "CONFIGS",
    "MemNet",
    "MemNetConfig",
    "ModelFileError",
    "ModelInfo",
    "TASKS",
    "conv_weight_count",
    "list_models",
    "load_model",
    "macs_per_pixel",
    "receptive_field",
    "save_model",
    "self_ensemble",
    "user_model_dir",
    "deepen",
    "widen",
]

from .engine import Cancelled, Progress, restore, restore_lazy, upscaled_geometry  # noqa: E402
from .io import Source, open_input, save_image  # noqa: E402
from .options import RestoreOptions  # noqa: E402

__all__ += ["Cancelled", "Progress", "RestoreOptions", "Source", "open_input", "restore", "restore_lazy",
            "save_image", "upscaled_geometry"]
from .outputs import OutputLocked, check_output_path  # noqa: E402

__all__ += ["OutputLocked", "check_output_path"]
