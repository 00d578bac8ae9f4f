import json
import pickle
import re
import sys

import numpy as np
import pytest
import tifffile
import torch

import memnet
from memnet.zoo import ModelFileError, read_info


def _save(model, path, **kw):
    meta = {
        "description": "test model",
        "normalization": {"mode": "natural"},
        "degradation": {"gaussian_sigma": [0, 75]},
        "training": {"data": "synthetic", "steps": 3},
        "metrics": {"Set12 s25": 12.5},
        "rank": 1,
    }
    meta.update(kw.pop("metadata", {}))
    return memnet.save_model(model, path, metadata=meta, **kw)


def test_an_early_file_saying_range_is_read_as_natural(tiny_model, tmp_path, rng):
    path = _save(tiny_model, tmp_path / "old.safetensors", name="old", task="denoise",
                 metadata={"normalization": {"mode": "range", "in_range": [0, 255]}}).path
    assert read_info(path).normalization == {"mode": "natural"}
    img = rng.integers(0, 255, (40, 40), dtype=np.uint8)
    expected = memnet.restore(img, tiny_model, device="cpu")
    np.testing.assert_array_equal(memnet.restore(img, path, device="cpu"), expected)


def test_round_trip_save_list_load(tiny_model, _isolated_user_models):
    path = _isolated_user_models / "my-denoiser.safetensors"
    info = _save(tiny_model, path, name="my-denoiser", task="denoise")
    assert info.name == "my-denoiser" and info.task == "denoise"

    listed = {m.name: m for m in memnet.list_models()}
    assert "my-denoiser" in listed and listed["my-denoiser"].source == "user"
    meta = listed["my-denoiser"].metadata
    assert meta["config"] == {"blocks": 2, "recursions": 2, "channels": 8, "in_channels": 1, "out_channels": 1}
    assert meta["degradation"] == {"gaussian_sigma": [0, 75]}
    assert meta["training"]["steps"] == 3 and meta["metrics"] == {"Set12 s25": 12.5}
    assert meta["package_version"] == memnet.__version__

    for ref in ("my-denoiser", path, str(path)):
        model, info2 = memnet.load_model(ref)
        assert not model.training
        assert info2.normalization == {"mode": "natural"}
        for k, v in tiny_model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v)
        x = torch.rand(1, 1, 17, 19)
        with torch.no_grad():
            torch.testing.assert_close(model(x), tiny_model(x))


def test_task_name_picks_highest_rank(tiny_model, _isolated_user_models):
    d = _isolated_user_models
    # Ranks above the shipped models' 10, so the shipped jpeg model is one of the candidates.
    _save(tiny_model, d / "a.safetensors", name="jpeg-a", task="jpeg", metadata={"rank": 11})
    _save(tiny_model, d / "b.safetensors", name="jpeg-b", task="jpeg", metadata={"rank": 15})
    _, info = memnet.load_model("jpeg")
    assert info.name == "jpeg-b"


def test_unknown_name_lists_what_exists():
    with pytest.raises(LookupError, match="unknown model 'nope'.*denoise"):
        memnet.load_model("nope")


def test_task_without_a_model_names_what_is_installed(tiny_model, _isolated_user_models, monkeypatch):
    from memnet import zoo

    mine = _save(tiny_model, _isolated_user_models / "j.safetensors", name="my-jpeg", task="jpeg")
    monkeypatch.setattr(zoo, "_scan_all", lambda: ([mine], []))  # whatever ships, no denoise model here
    with pytest.raises(LookupError, match=r"task 'denoise'.*microscopy.*installed models: my-jpeg \(jpeg\)"):
        memnet.load_model("denoise")


def test_missing_file_is_named(tmp_path):
    p = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        memnet.load_model(p)


def test_truncated_file_is_refused_with_its_name(tiny_model, tmp_path):
    p = tmp_path / "m.safetensors"
    _save(tiny_model, p, name="m", task="denoise")
    data = p.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.safetensors"):
        memnet.load_model(bad)


def test_corrupt_header_is_refused(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match="garbage.safetensors.*not a readable .safetensors"):
        memnet.load_model(bad)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle payload executed')",))


def test_pickled_file_is_refused_and_never_executed(tmp_path):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(ModelFileError, match="evil.safetensors.*pickle.*refused"):
        memnet.load_model(p)
    t = tmp_path / "ckpt.safetensors"
    torch.save({"w": torch.zeros(3)}, t)
    with pytest.raises(ModelFileError, match="ckpt.safetensors.*torch.save"):
        memnet.load_model(t)


def test_safetensors_without_our_metadata(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFileError, match="foreign.safetensors.*without napari-memnet metadata"):
        memnet.load_model(p)


def _file_parts(path) -> tuple[dict, dict]:
    """A model file's memnet metadata and tensors, to write a doctored copy."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["memnet"]), {k: f.get_tensor(k) for k in f.keys()}


def test_mismatched_weights_name_the_mismatch(tiny_model, tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    _save(tiny_model, p, name="m", task="denoise")
    # Rewrite the file claiming a wider architecture than its tensors have.
    meta, tensors = _file_parts(p)
    meta["config"]["channels"] = 16
    bad = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(bad), metadata={"memnet": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=r"mismatch.safetensors.*M2R2C16.*shape mismatches"):
        memnet.load_model(bad)
    # ...and one with a tensor missing.
    del tensors["recon_conv.weight"]
    meta["config"]["channels"] = 8
    bad2 = tmp_path / "missing-tensor.safetensors"
    save_file(tensors, str(bad2), metadata={"memnet": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=r"missing-tensor.safetensors.*missing tensors.*recon_conv.weight"):
        memnet.load_model(bad2)


def test_unusable_user_file_is_skipped_with_a_warning(tiny_model, _isolated_user_models):
    d = _isolated_user_models
    _save(tiny_model, d / "good.safetensors", name="good", task="microscopy")
    (d / "broken.safetensors").write_bytes(b"not weights at all")
    with pytest.warns(UserWarning, match="broken.safetensors"):
        names = [m.name for m in memnet.list_models()]
    assert "good" in names


def test_save_rejects_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        memnet.save_model(tiny_model, tmp_path / "x.safetensors", name="x", task="deblur")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        memnet.save_model(tiny_model, tmp_path / "x.pt", name="x", task="denoise")


def test_read_info_does_not_need_tensors(tiny_model, tmp_path):
    p = tmp_path / "m.safetensors"
    _save(tiny_model, p, name="m", task="sr")
    info = read_info(p)
    assert info.task == "sr" and info.macs_per_pixel == memnet.macs_per_pixel(info.config)
    assert info.receptive_field == memnet.receptive_field(tiny_model)


def test_every_task_has_a_shipped_model_that_beats_its_peer():
    """The design's contract: a task name alone picks a shipped model, for every task."""
    shipped = {m.task: m for m in memnet.list_models() if m.source == "shipped"}
    assert set(shipped) == set(memnet.TASKS)
    model, info = memnet.load_model("denoise")
    assert info.source == "shipped" and info.config.channels == 64
    # A shipped card never keeps the "in training" status of the progress copy it was promoted from.
    assert not [s.name for s in shipped.values() if "in training" in str(s.metadata.get("status", ""))]
    # Its card: Set12 figures ahead of BM3D's published 32.37 / 29.97 / 26.72 on every sigma.
    m = info.metrics
    assert m["sigma15"] > 32.37 and m["sigma25"] > 29.97 and m["sigma50"] > 26.72
    x = (np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)
    out = memnet.restore(x, "denoise", device="cpu")
    assert out.shape == x.shape and out.dtype == np.uint8


def _rewrite(tiny_model, path, config=None, tensors=None):
    from safetensors.torch import save_file

    t = tensors or {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    meta = {"format": 1, "name": "evil", "task": "denoise", "config": {**tiny_model.config.as_dict(), **(config or {})}}
    save_file(t, str(path), metadata={"memnet": json.dumps(meta)})
    return path


@pytest.mark.parametrize("config, what", [({"blocks": 100000}, "blocks=100000"),
                                          ({"channels": 200000}, "channels=200000"),
                                          ({"recursions": "6"}, "recursions='6'")])
def test_a_metadata_bomb_is_refused_before_anything_is_built(tiny_model, tmp_path, config, what, monkeypatch):
    p = _rewrite(tiny_model, tmp_path / "bomb.safetensors", config)

    def never(*a, **k):
        raise AssertionError("a model was built from a metadata bomb")

    monkeypatch.setattr(memnet.model.MemNet, "__init__", never)  # refused from the header, nothing built
    with pytest.raises(ModelFileError, match=f"bomb.safetensors: metadata claims {re.escape(what)}"):
        memnet.load_model(p)
    from memnet.zoo import load_model_bytes

    with pytest.raises(ModelFileError, match="model bytes: metadata claims"):
        load_model_bytes(p.read_bytes())


# The CLI in a child whose address space is capped (RLIMIT_AS): one thread and two malloc arenas keep
# torch's own footprint (about 0.9 GiB of address space, measured) independent of the core count.
_UNDER_A_MEMORY_LIMIT = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from memnet.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
@pytest.mark.slow
def test_a_metadata_bomb_under_a_memory_limit_is_a_clean_refusal(tiny_model, tmp_path):
    import os
    import subprocess

    import tifffile

    src = tmp_path / "small.tif"
    tifffile.imwrite(src, (np.random.default_rng(0).random((64, 64)) * 3000).astype(np.uint16))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "CUDA_VISIBLE_DEVICES": ""}

    def restore(model, out):
        cmd = [sys.executable, "-c", _UNDER_A_MEMORY_LIMIT, str(2 * 2**30), "restore", str(src), "-o", str(out),
               "--model", str(model), "--device", "cpu", "-q"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    # The limit leaves room for a real run: a refusal below is the check's, not the limit's.
    fine = restore(_rewrite(tiny_model, tmp_path / "fine.safetensors"), tmp_path / "fine.tif")
    assert fine.returncode == 0 and (tmp_path / "fine.tif").exists(), fine.stderr
    # Built, either bomb exhausts these 2 GiB (a MemoryError / "can't allocate memory" traceback, exit 1).
    for config, what in (({"blocks": 100000}, "blocks=100000"), ({"channels": 200000}, "channels=200000")):
        bomb = _rewrite(tiny_model, tmp_path / "bomb.safetensors", config)
        run = restore(bomb, tmp_path / "out.tif")
        assert run.returncode == 2, run.stderr
        assert run.stderr.splitlines() == [f"memnet restore: error: {bomb}: metadata claims {what}; a MemNet has "
                                           f"1 to {1024 if 'channels' in what else 64}: the file is corrupt or "
                                           "not a napari-memnet model"]
        assert not (tmp_path / "out.tif").exists()


def test_a_plausible_architecture_that_does_not_match_the_tensors_is_refused(tiny_model, tmp_path):
    p = _rewrite(tiny_model, tmp_path / "liar.safetensors", {"blocks": 40, "channels": 512})
    with pytest.raises(ModelFileError, match=r"liar.safetensors: weights do not match .*M40R2C512.*missing"):
        memnet.load_model(p)


def test_non_finite_weights_are_refused_at_load(tiny_model, tmp_path):
    t = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items()}
    t["recon_conv.weight"].view(-1)[3] = float("nan")
    p = _rewrite(tiny_model, tmp_path / "nan.safetensors", tensors=t)
    with pytest.raises(ModelFileError, match=r"nan.safetensors: 1 tensors hold NaN or Inf \(e.g. recon_conv.weight\)"):
        memnet.load_model(p)
    from memnet.zoo import load_model_bytes

    with pytest.raises(ModelFileError, match="NaN or Inf"):
        load_model_bytes(p.read_bytes())


@pytest.mark.parametrize("policy, what", [({"mode": "wavelet"}, "is not one of natural, range or percentile"),
                                          ({"mode": "percentile", "low": "a", "high": 99}, "low='a'"),
                                          ({"mode": "percentile", "low": 60, "high": 40}, "0 <= low < high")])
def test_bad_intensity_policy_in_metadata_names_the_file(tiny_model, tmp_path, policy, what):
    from safetensors.torch import save_file

    p = tmp_path / "policy.safetensors"
    meta = {"format": 1, "name": "p", "task": "microscopy", "config": tiny_model.config.as_dict(),
            "normalization": policy}
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(p),
              metadata={"memnet": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=f"policy.safetensors: metadata .*{re.escape(what)}"):
        memnet.load_model(p)


# --- model names (issue #32, item 4): task and shipped names reserved, duplicates named, paths only as paths ---

def test_a_reserved_name_is_refused_for_a_new_user_model(tiny_model, _isolated_user_models, tmp_path, capsys):
    from memnet.cli import main
    from memnet.finetune import FinetuneConfig, finetune

    shipped = next(m.name for m in memnet.list_models() if m.source == "shipped")
    for name, what in (("microscopy", "a task name"), (shipped, "the name of a shipped model")):
        with pytest.raises(ValueError, match=f"'{name}' is {what}, reserved .* e.g. '{name}-1'"):
            memnet.save_model(tiny_model, _isolated_user_models / "x.safetensors", name=name, task="microscopy")
        with pytest.raises(ValueError, match=f"'{name}' is {what}"):
            finetune(FinetuneConfig(model="microscopy", mode="n2v", name=name, steps=2), np.zeros((64, 64)))
    assert not _isolated_user_models.exists() or not list(_isolated_user_models.iterdir())
    data = tmp_path / "n.tif"
    tifffile.imwrite(data, np.zeros((64, 64), np.uint16))
    rc = main(["finetune", "--model", "microscopy", "--mode", "n2v", "--data", str(data), "-o", "microscopy",
               "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "'microscopy' is a task name, reserved for the shipped models" in err
    memnet.save_model(tiny_model, tmp_path / "elsewhere.safetensors", name="microscopy", task="microscopy")  # a path


def test_a_user_file_declaring_a_reserved_name_is_shown_ignored_never_chosen(tiny_model, _isolated_user_models,
                                                                             tmp_path, capsys):
    from memnet.cli import main

    shipped = {m.name: m for m in memnet.list_models() if m.source == "shipped"}
    _isolated_user_models.mkdir()
    for name in ("microscopy", "microscopy-M4R4C32"):  # copied in by hand, bypassing save_model's check
        p = tmp_path / f"{name}.safetensors"
        memnet.save_model(tiny_model, p, name=name, task="microscopy", metadata={"rank": 99})
        p.rename(_isolated_user_models / f"hand-{name}.safetensors")
    with pytest.warns(UserWarning, match="hand-microscopy.safetensors is ignored .*'microscopy' is a task name"):
        names = [m.name for m in memnet.list_models()]
    assert names.count("microscopy-M4R4C32") == (1 if "microscopy-M4R4C32" in shipped else 0)
    assert "microscopy" not in names
    _, info = memnet.load_model("microscopy")
    assert info.source == "shipped"  # the task picks the shipped model, despite the user file's rank 99
    if "microscopy-M4R4C32" in shipped:
        assert memnet.load_model("microscopy-M4R4C32")[1].source == "shipped"
    assert main(["models"]) == 0
    out, err = capsys.readouterr()
    assert "user, ignored" in out and "microscopy -> microscopy-M4R4C32" in out and "(user)" not in out
    assert "warning: user model file" in err and "hand-microscopy.safetensors" in err


def test_two_user_files_with_one_name_are_an_error_naming_both(tiny_model, _isolated_user_models, capsys):
    from memnet.cli import main

    for f in ("a.safetensors", "b.safetensors"):
        _save(tiny_model, _isolated_user_models / f, name="lab", task="microscopy")
    with pytest.raises(LookupError, match=r"two user model files declare the name 'lab': .*a.safetensors and "
                                          r".*b.safetensors; rename or remove one"):
        memnet.load_model("lab")
    assert memnet.load_model(_isolated_user_models / "b.safetensors")[1].path.name == "b.safetensors"  # by path
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.count("user, ambiguous") == 2


def test_a_folder_named_like_a_model_does_not_hijack_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "microscopy").mkdir()
    (tmp_path / "nope").mkdir()
    assert memnet.load_model("microscopy")[1].source == "shipped"
    with pytest.raises(LookupError, match=r"unknown model 'nope'.*\('nope' here is not a model file: pass ./nope"):
        memnet.load_model("nope")
    with pytest.raises(ModelFileError, match="microscopy: a folder, not a .safetensors model file"):
        memnet.load_model("./microscopy")  # a path is a path


def test_architecture_check_builds_nothing(tiny_model, tmp_path, monkeypatch):
    """The check compares a file's tensors with the shapes its claimed architecture has (`arch.state_shapes`),
    without laying out any model: a claim far larger than the file is refused naming the mismatch, and nothing
    was built for it."""
    from safetensors.torch import save_file

    built = []
    real = memnet.MemNet.__init__
    monkeypatch.setattr(memnet.MemNet, "__init__", lambda self, *a, **kw: built.append(kw) or real(self, *a, **kw))
    p = tmp_path / "m.safetensors"
    _save(tiny_model, p, name="m", task="denoise")
    built.clear()
    meta, tensors = _file_parts(p)
    meta["config"]["channels"] = 1024
    bad = tmp_path / "huge.safetensors"
    save_file(tensors, str(bad), metadata={"memnet": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=r"huge.safetensors.*C1024.*shape mismatches"):
        memnet.load_model(bad)
    assert built == []
    memnet.load_model(p)
    assert len(built) == 1  # the model itself, once the check passed
