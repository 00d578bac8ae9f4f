"""The run's floor (memnet.runtime): an unavailable device is one clear line naming the devices there are."""

import numpy as np
import pytest
import tifffile

import memnet
from memnet.cli import main


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7"])
def test_an_unavailable_device_is_a_clean_error_listing_what_is_available(device, micro_file, tmp_path, capsys):
    if device in memnet.engine.available_devices():
        pytest.skip(f"{device} exists on this machine: nothing unavailable to ask for")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((20, 20), np.uint16))
    rc = main(["restore", str(src), "-o", str(tmp_path / "o.tif"), "--model", str(micro_file), "--device", device])
    err = capsys.readouterr().err
    if device.split(":")[0] in memnet.engine.available_devices():  # e.g. cuda:7 on a machine with fewer GPUs
        assert rc == 2 and f"device '{device}' does not exist" in err and "available here: auto, cpu" in err
    else:
        assert rc == 2 and f"device '{device}' requested but" in err and "available: auto, cpu" in err
    assert "Traceback" not in err
