"""Completion follows content: an upstream change redoes exactly the steps downstream of it.

Also the per-step lock (a second run on one output folder stops with one line) and the clean-up
of temp files that a killed run left behind.
"""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import dataset_main
from pipeline.digests import DigestCache, content_digest, record_outputs
from pipeline.errors import UserError
from pipeline.locks import remove_stale_temps, step_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# digests


def test_recorded_digest_is_used_only_while_size_and_mtime_match(tmp_path):
    f = tmp_path / "run" / "features" / "x.npy"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"a" * 1000)
    outputs = record_outputs(tmp_path / "run", [f])
    assert outputs == {"features/x.npy": [1000, f.stat().st_mtime_ns, content_digest(f)]}
    # a producer record whose digest is deliberately not the file's: taken as is while the file is untouched
    outputs["features/x.npy"][2] = "recorded"
    (tmp_path / "run" / "features.done.json").write_text(json.dumps({"output_digests": outputs}))
    assert DigestCache().digest(f) == "recorded"
    # a same-size change in the middle, with a new mtime: hashed in full
    data = bytearray(f.read_bytes())
    data[500] = ord("b")
    f.write_bytes(bytes(data))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1000))
    assert DigestCache().digest(f) == content_digest(f) != "recorded"


def test_folder_digest_follows_member_content_not_count(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        (d / f"{i:04d}.png").write_bytes(bytes([i]) * 10)
    before = DigestCache().digest(d)
    (d / ".0001.png.abcd1234.tmp.png").write_bytes(b"half written")  # temp files are not members
    assert DigestCache().digest(d) == before
    (d / "0001.png").write_bytes(b"\x09" * 10)
    after = DigestCache().digest(d)
    assert after.startswith("dir:") and after != before
    assert DigestCache().digest(tmp_path / "absent") == "missing"


# ---------------------------------------------------------------------------------------------
# the three probes of issue 18 on a tiny pipeline


def _args(tmp, *extra):
    return ["--config", os.path.join(ROOT, "configs", "demo.toml"), "--subject", "1", "--no-progress",
            "--data-dir", str(tmp / "data"), "--results-dir", str(tmp / "res"),
            # 40 × 192² × 3 bytes: the stimulus file is over 4 MiB, where digests used to skip the middle
            "--set", "synthetic.n_train=40", "--set", "synthetic.n_test=4",
            "--set", "synthetic.image_size=192", "--set", "versatile.num_inference_steps=4",
            "--set", "versatile.batch_size=2", *extra]


def _ran(caplog) -> list[str]:
    steps = re.findall(r"\[(\w+)\] sub1/base: start", caplog.text)
    caplog.clear()
    return steps


@pytest.mark.slow
def test_an_upstream_change_redoes_exactly_the_steps_downstream(tmp_path, caplog):
    caplog.set_level("INFO", logger="recon")
    assert dataset_main("synthetic", _args(tmp_path)) == 0
    assert _ran(caplog) == ["prepare", "features", "ridge", "vdvae_init", "versatile", "evaluate"]
    metrics = tmp_path / "res" / "synthetic" / "sub1" / "base" / "eval" / "metrics.json"

    # 1. new init images: versatile and evaluate follow, although the image count is the same
    seed = ["--set", "vdvae_init.seed=5"]
    assert dataset_main("synthetic", _args(tmp_path, *seed)) == 0
    assert _ran(caplog) == ["vdvae_init", "versatile", "evaluate"]

    # 2. new reconstructions: the old metrics are not kept
    stamp = metrics.stat().st_mtime_ns
    guidance = seed + ["--set", "versatile.guidance_scale=3"]
    assert dataset_main("synthetic", _args(tmp_path, *guidance)) == 0
    assert _ran(caplog) == ["versatile", "evaluate"]
    assert metrics.stat().st_mtime_ns != stamp

    # 3. a same-size change in the middle of a large common-format file: everything after prepare
    stim = tmp_path / "data" / "synthetic" / "sub1" / "train_stim_sub1.npy"
    assert stim.stat().st_size > 4 * 2**20
    arr = np.load(stim, mmap_mode="r+")
    arr[20] = 255 - arr[20]
    arr.flush()
    del arr
    assert dataset_main("synthetic", _args(tmp_path, *guidance)) == 0
    assert _ran(caplog) == ["features", "ridge", "vdvae_init", "versatile", "evaluate"]

    # and with nothing changed, nothing runs
    assert dataset_main("synthetic", _args(tmp_path, *guidance)) == 0
    assert _ran(caplog) == []


# ---------------------------------------------------------------------------------------------
# lock and temp files


def test_step_lock_refuses_a_second_holder_and_frees_after_a_kill(tmp_path):
    lock = tmp_path / "sub1" / "ridge.lock"
    with step_lock(lock, "step ridge"):
        with pytest.raises(UserError, match=rf"ridge.lock: step ridge is being run by pid {os.getpid()} on "):
            with step_lock(lock, "step ridge"):
                pass
    assert not lock.exists()
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pipeline.locks import step_lock\n"
            "with step_lock(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock), ROOT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            with step_lock(lock, "x"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with step_lock(lock, "x"):  # the kernel dropped the dead holder's lock; its file is reused
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_second_run_on_a_locked_step_exits_2_with_one_line(tmp_path, capsys):
    from pipeline.common_format import subject_dir

    lock = subject_dir(tmp_path / "data", "synthetic", 1) / "prepare.lock"
    args = ["--only", "prepare", "--data-dir", str(tmp_path / "data"), "--subject", "1", "--no-progress",
            "--set", "synthetic.n_train=5", "--set", "synthetic.n_test=2", "--set", "synthetic.image_size=16"]
    with step_lock(lock, "step prepare for sub1/base"):
        assert dataset_main("synthetic", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prepare.lock: step prepare for sub1/base is being run by pid" in err[0]
    assert not (lock.parent / "prepare.done.json").exists()
    assert dataset_main("synthetic", args) == 0


def test_stale_temp_files_of_a_step_are_removed_when_it_starts(tmp_path, caplog):
    from pipeline.common_format import subject_dir

    d = subject_dir(tmp_path / "data", "synthetic", 1)
    d.mkdir(parents=True)
    stale = d / ".train_stim_sub1.npy.k3j_x9q2.tmp.npy"
    other = d / ".notes.txt.k3j_x9q2.tmp.txt"
    stale.write_bytes(b"x" * 100)
    other.write_bytes(b"y")
    caplog.set_level("INFO", logger="recon")
    args = ["--only", "prepare", "--data-dir", str(tmp_path / "data"), "--subject", "1", "--no-progress",
            "--set", "synthetic.n_train=5", "--set", "synthetic.n_test=2", "--set", "synthetic.image_size=16"]
    assert dataset_main("synthetic", args) == 0
    assert not stale.exists() and other.exists()  # only temporaries of this step's outputs
    assert "removed 1 temp file(s)" in caplog.text
    assert remove_stale_temps([d / "train_stim_sub1.npy"]) == []
