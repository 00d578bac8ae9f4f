"""dask.distributed runs, resume after kill -9, and done-markers."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

import memnet


@pytest.fixture
def stack(tmp_path, rng):
    x = (rng.random((3, 130, 150)) * 4000).astype(np.uint16)
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, x, imagej=True, metadata={"axes": "ZYX"})
    return p


def _single_thread_reference(*args, **kwargs):
    """dask workers run torch on one thread: compare with the same numerical set-up (a different
    thread count changes float summation order, which can flip a rounding by one level)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return memnet.restore(*args, **kwargs)
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_two_worker_local_cluster_matches_single_process(stack, micro_file, tmp_path):
    from distributed import Client, LocalCluster

    ref = _single_thread_reference(stack, micro_file, tile=48, device="cpu", batch_size=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        seen = []
        out = memnet.restore(stack, micro_file, output=tmp_path / "d.zarr", tile=48, device="cpu", batch_size=2,
                             client=client, progress=seen.append)
        assert seen[-1].done == seen[-1].total == 3 * 3 * 4
        # A worker killed mid-run: the job still completes, identically.
        out2 = tmp_path / "k.zarr"
        killed = []

        def kill_one(p):
            if not killed and p.done >= 6:
                addr = sorted(client.scheduler_info()["workers"])[0]
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)  # kill -9 a worker process mid-run
                killed.append(pid)

        memnet.restore(stack, micro_file, output=out2, tile=48, device="cpu", batch_size=2, client=client,
                       progress=kill_one)
        assert killed
    np.testing.assert_array_equal(out[:], ref)
    np.testing.assert_array_equal(zarr.open_group(str(out2), mode="r")["0"][:], ref)
    assert zarr.open_group(str(out2), mode="r").attrs["memnet"]["complete"] is True


@pytest.mark.slow
def test_cli_workers_option(stack, micro_file, tmp_path):
    from memnet.cli import main

    assert main(["restore", str(stack), "-o", str(tmp_path / "w.zarr"), "--model", str(micro_file), "--tile", "64",
                 "--workers", "2", "--device", "cpu", "-q"]) == 0
    ref = _single_thread_reference(stack, micro_file, tile=64, device="cpu")
    got = zarr.open_group(str(tmp_path / "w.zarr"))["0"][:]
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 1


@pytest.mark.slow
def test_kill_9_and_resume_many_times_is_byte_identical(tmp_path, rng, micro_file, held_restore):
    """Killed -9 ten times mid-run, each time at a point the test chose (a random number of new groups,
    then a random number of the next group's blocks, 0 to all), and resumed: the output is byte-identical
    to an uninterrupted run. The runs are held there until killed, so no kill depends on speed."""
    x = (rng.random((40, 128, 128)) * 4000).astype(np.uint16)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, metadata={"axes": "ZYX"})
    groups, blocks = 40 * 4, 4  # batch 1: a group is one row of 4 tiles, 4 rows per plane

    def args(out):
        return [src, "-o", out, "--model", micro_file, "--tile", "32", "--device", "cpu", "--batch-size", "1",
                "--resume", "-q"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "memnet.cli", "restore", *map(str, args(tmp_path / "ref.zarr"))],
                         env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out.zarr"
    markers = tmp_path / "out.zarr.memnet" / "done"  # beside the store, where readers do not trip on it

    def n_done():
        return len(list(markers.glob("*"))) if markers.is_dir() else 0

    pick = np.random.default_rng(1)
    for _ in range(10):
        new, more = int(pick.integers(0, 7)), int(pick.integers(0, blocks + 1))
        new, before = (new or int(more == 0)), n_done()  # at least one marker or block
        assert before + new < groups  # the run is held before its end
        proc = held_restore(args(out), new, more)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert n_done() == before + new  # the groups it was held after, and no more
        assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False  # never marked complete
    res = subprocess.run([sys.executable, "-m", "memnet.cli", "restore", *map(str, args(out))], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    assert a.attrs["memnet"]["complete"] is True
    assert a["0"][:].tobytes() == b["0"][:].tobytes()


def test_resume_refuses_a_different_job(stack, micro_file, tmp_path, tiny_model):
    out = tmp_path / "o.zarr"
    memnet.restore(stack, micro_file, output=out, tile=48, device="cpu")
    with pytest.raises(ValueError, match="cannot resume .*different parameters.*tile"):
        memnet.restore(stack, micro_file, output=out, tile=64, device="cpu", resume=True)
    other = tmp_path / "other.safetensors"
    memnet.save_model(tiny_model, other, name="other", task="denoise")
    with pytest.raises(ValueError, match="cannot resume .*model"):
        memnet.restore(stack, other, output=out, tile=48, device="cpu", resume=True)
    with pytest.raises(ValueError, match="resume needs a .zarr output"):
        memnet.restore(stack, micro_file, output=tmp_path / "o.tif", device="cpu", resume=True)


def test_resume_skips_done_groups(stack, micro_file, tmp_path):
    out = tmp_path / "o.zarr"
    from memnet.outputs import write_marker

    ref = memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", batch_size=3)[:]
    done = tmp_path / "o.zarr.memnet" / "done"
    assert not done.parent.exists()  # a complete run leaves nothing beside its output
    # A run interrupted after all groups but one (3 planes x 3 tile rows; one row of 4 tiles fills a
    # batch of 3), that group's chunks zeroed: resume redoes exactly that group.
    for key in [f"{p}-{r}" for p in range(3) for r in range(3)][1:]:
        write_marker(done, key)
    root = zarr.open_group(str(out), mode="r+")
    root.attrs["memnet"] = {**root.attrs["memnet"], "complete": False}
    arr = root["0"]
    arr[0, :48, :] = 0
    seen = []
    memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", batch_size=3, resume=True,
                   progress=seen.append)
    # Only the missing group's 4 tiles are recomputed (in batches of 3 + 1), from 32 of 36 done.
    assert [p.done for p in seen] == [35, 36] and seen[-1].total == 36
    assert seen[0].skipped == 32  # the ETA is computed from the tiles this run did, not the skipped ones
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], ref)
    assert not done.parent.exists()
    # Resuming a complete output is a no-op.
    seen.clear()
    memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", batch_size=3, resume=True,
                   progress=seen.append)
    assert seen == [] or seen[-1].skipped == 36


@pytest.mark.slow
def test_self_ensemble_on_workers_matches_single_process_and_resume_checks_it(stack, micro_file, tmp_path):
    from memnet.cli import main

    out = tmp_path / "e.zarr"
    assert main(["restore", str(stack), "-o", str(out), "--model", str(micro_file), "--tile", "64",
                 "--workers", "2", "--device", "cpu", "--ensemble", "-q"]) == 0
    ref = _single_thread_reference(stack, micro_file, tile=64, device="cpu", ensemble=True)
    plain = _single_thread_reference(stack, micro_file, tile=64, device="cpu")
    got = zarr.open_group(str(out), mode="r")["0"][:]
    np.testing.assert_array_equal(got, ref)
    assert np.abs(got.astype(int) - plain).max() > 0
    with pytest.raises(ValueError, match="cannot resume .*different parameters.*ensemble"):
        memnet.restore(stack, micro_file, output=out, tile=64, device="cpu", resume=True)


@pytest.mark.slow
def test_distributed_workers_run_with_the_callers_amp_and_memory_budget(stack, micro_file, tmp_path):
    """Every restore option reaches the workers: amp as asked (not the default), and the memory budget
    sets the batch they run (a 1-byte budget: one tile per forward pass)."""
    from distributed import Client, LocalCluster

    out = tmp_path / "d.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", amp="on", memory_budget=1,
                             client=client)[:]
        reports = [r for rs in client.run(memnet.distributed.worker_report).values() for r in rs]
    [r] = reports
    assert r["amp"] == "on" and r["options"]["amp"] == "on"
    assert r["options"]["memory_budget"] == 1 and r["batch"] == 1
    assert r["groups"] == 3 * 3  # 3 planes x 3 tile rows, one row per group at batch 1
    assert r["amp_dtype"] == "None"  # AMP runs on CUDA only: on CPU workers, fp32
    job = zarr.open_group(str(out), mode="r").attrs["memnet"]["job"]
    assert job["amp"] == "on" and job["memory_budget"] == 1
    ref = _single_thread_reference(stack, micro_file, tile=48, device="cpu", amp="on", memory_budget=1)
    np.testing.assert_array_equal(got, ref)


def test_resume_refuses_a_different_amp_and_allows_a_different_speed(stack, micro_file, tmp_path, capsys):
    from memnet.cli import main

    out = tmp_path / "o.zarr"
    memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", amp="off", batch_size=3)
    root = zarr.open_group(str(out), mode="r+")
    root.attrs["memnet"] = {**root.attrs["memnet"], "complete": False}  # as if interrupted
    rc = main(["restore", str(stack), "-o", str(out), "--model", str(micro_file), "--tile", "48", "--device", "cpu",
               "--resume", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot resume" in err and "amp: 'off' then, 'auto' now" in err
    # Device, batch size and memory budget change the speed, not the result: a resume may change them.
    memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", amp="off", batch_size=2,
                   memory_budget=10**9, resume=True)
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is True


def test_an_older_job_record_without_the_newer_options_still_resumes(stack, micro_file, tmp_path):
    """Outputs written before amp (and ensemble, when off) were recorded: a missing option had its
    default, so a resume with the defaults continues and one with another amp is refused."""
    out = tmp_path / "o.zarr"
    ref = memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", batch_size=3)[:]
    root = zarr.open_group(str(out), mode="r+")
    job = {k: v for k, v in root.attrs["memnet"]["job"].items()
           if k not in ("amp", "ensemble", "device", "batch_size", "memory_budget")}
    root.attrs["memnet"] = {"complete": False, "job": job}
    with pytest.raises(ValueError, match="cannot resume .*amp: 'auto' then, 'on' now"):
        memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", amp="on", resume=True)
    got = memnet.restore(stack, micro_file, output=out, tile=48, device="cpu", batch_size=3, resume=True)[:]
    np.testing.assert_array_equal(got, ref)
