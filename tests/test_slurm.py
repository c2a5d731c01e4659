"""The SLURM executor against a real one-node SLURM (slurmctld + slurmd + munge on localhost).

A small grid goes through the real ``sbatch`` via ``re_recon_main.py --executor slurm`` and is
followed only through the project's own records (``--status``, ``--dry-run``) plus ``squeue``:
dependency order, a failing task (state ``failed`` with its log), ``scancel`` of a running task
(nothing that looks complete is left), and a resubmission that runs only what is missing.

The session fixture installs ``slurm-wlm`` and ``munge`` with apt when they are absent (root only;
about 20 s with a reachable Debian mirror, not counted in the test's own time) and skips with the
reason elsewhere. ``RECON_NO_SLURM=1`` skips it on purpose. No daemon outlives the session.
"""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from slurm_cluster import Cluster, ensure_installed

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SLOW = "slow_num_inference_steps-1000"  # 750 denoising steps: long enough to be cancelled mid-step


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no one-node SLURM here: {reason}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as exc:
        cluster.stop()
        pytest.skip(f"one-node SLURM did not start: {str(exc).splitlines()[0]}")
    yield cluster
    killed = cluster.stop()
    assert not killed, f"SLURM processes had to be killed at teardown: {killed}"


def _grid(tmp_path: Path) -> Path:
    path = tmp_path / "slurmgrid.toml"
    path.write_text(textwrap.dedent(f"""
        [experiment]
        dataset = "synthetic"
        subjects = ["1"]
        configs = ["{ROOT}/configs/demo.toml"]
        [set]
        "paths.data_dir" = "{tmp_path}/data"
        "paths.results_dir" = "{tmp_path}/res"
        "synthetic.n_train" = 24
        "synthetic.n_test" = 2
        "synthetic.image_size" = 64
        "versatile.num_inference_steps" = 4
        "evaluate.images" = ["versatile"]
        [[variants]]
        method = "random"
        fraction = 0.5
        [[variants]]
        method = "captions"
        file = "captions/fixed_captions.npy"
        [[variants]]
        name = "slow"
        method = "settings"
        "versatile.num_inference_steps" = 1000
    """))
    return path


@pytest.fixture
def main(slurm, monkeypatch, capsys):
    """re_recon_main.py in this process (as a user's shell would run it, minus the start-up time):
    SLURM_CONF points sbatch/squeue at the private cluster; submitted jobs inherit the environment."""
    import re_recon_main

    for k, v in {"SLURM_CONF": str(slurm.conf), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)

    def run(*args: str) -> str:
        capsys.readouterr()
        rc = re_recon_main.main(list(args))
        captured = capsys.readouterr()
        assert rc == 0, f"re_recon_main.py {' '.join(args)} failed:\n{captured.out}\n{captured.err}"
        return captured.out
    return run


def _status(main, grid: Path) -> dict[str, tuple[str, str, str]]:
    """task -> (state, log, error) from the --status table."""
    lines = main(str(grid), "--status").splitlines()
    rows = {}
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[cells[0]] = (cells[1], cells[2] if len(cells) > 2 else "", cells[3] if len(cells) > 3 else "")
    return rows


def _submitted(out: str) -> dict[str, tuple[str, str]]:
    """task -> (job id, log) from the 'submitted …' lines."""
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"submitted (\S+) \(job (\d+), log (\S+)\)", out)}


def _wait(what: str, cond, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _record(res: Path, task: str) -> dict:
    path = res / "experiments" / "slurmgrid" / "tasks" / f"{task}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_grid_through_real_sbatch(tmp_path, slurm, main):
    t_start = time.monotonic()
    grid = _grid(tmp_path)
    res, sub = tmp_path / "res", tmp_path / "res" / "synthetic" / "sub1"
    args = [str(grid), "--executor", "slurm", "--partition", slurm.partition, "--gpus", "0", "--cpus", "1",
            "--mem", "1", "--time", "10", "--no-progress"]
    base, good, bad = "sub1__base", "sub1__random_fraction-0.5", "sub1__captions_file-fixed_captions"
    slow = f"sub1__{SLOW}"

    # 1. submission: the base task first, the other three held by SLURM on a dependency
    out = main(*args)
    assert "4 tasks, 0 complete, 4 to run" in out
    jobs = _submitted(out)
    assert set(jobs) == {base, good, bad, slow}
    queue = slurm.run("squeue", "-h", "-o", "%i %T %r").stdout
    reasons = {line.split()[0]: line.split()[1:] for line in queue.splitlines()}
    for task in (good, bad, slow):
        state, why = reasons[jobs[task][0]]
        assert state == "PENDING" and why == "Dependency", (task, queue)

    # 2. the slow task reaches its versatile step and is cancelled there: SIGTERM (ignored by
    #    submitit), SIGKILL 5 s later; the good and the failing task finish meanwhile
    started = sub / SLOW / "versatile.started.json"
    _wait("the slow task's versatile step", started.is_file, 150, 0.5)
    time.sleep(2)  # into the denoising loop
    slurm.run("scancel", jobs[slow][0])
    _wait("the good and the failing task", lambda: _record(res, good).get("state") == "done"
          and _record(res, bad).get("state") == "failed", 120)
    slurm.wait_idle(60)
    recs = {t: _record(res, t) for t in (base, good, bad, slow)}
    for task in (good, bad, slow):  # dependency order, from the tasks' own records
        assert recs[task]["started"] >= recs[base]["finished"], (task, recs[task], recs[base])

    # 3. the cancelled task left nothing that looks complete
    assert not (sub / SLOW / "versatile.done.json").exists()
    assert not (sub / SLOW / "evaluate.done.json").exists()
    assert not list((sub / SLOW).glob("images/versatile/*.png")), "a cancelled step left images"
    assert not (sub / SLOW / "eval").exists()

    # 4. --status, read from the project's records
    status = _status(main, grid)
    assert status[base][0] == "done" and status[good][0] == "done"
    assert status[bad][0] == "failed" and status[bad][2].startswith("UserError"), status[bad]
    failed_log = Path(status[bad][1])
    assert failed_log == Path(jobs[bad][1]) and failed_log.is_file()
    assert "fixed_captions.npy" in failed_log.read_text(), "the failed task's log does not say what went wrong"
    assert status[slow][0] == "interrupted", status[slow]
    # seen from another node the pid means nothing: then squeue's CANCELLED state tells
    rec_path = res / "experiments" / "slurmgrid" / "tasks" / f"{slow}.json"
    rec_path.write_text(json.dumps(dict(_record(res, slow), host="some-other-node")))
    assert _status(main, grid)[slow][0] == "interrupted"
    assert "4 tasks, 2 complete, 2 to run" in main(str(grid), "--dry-run")

    # 5. fix the failing task's input, resubmit: only the two missing tasks run
    from pipeline.common_format import read_split

    train = read_split(tmp_path / "data" / "synthetic" / "sub1", "train", "1", parts=("ids", "cap"))
    (tmp_path / "data" / "captions").mkdir()
    np.save(tmp_path / "data" / "captions" / "fixed_captions.npy", np.asarray(train.cap)[:, :1])
    np.save(tmp_path / "data" / "captions" / "fixed_ids.npy", np.asarray(train.ids))
    done_before = {t: (sub / v / "evaluate.done.json").stat().st_mtime_ns
                   for t, v in ((base, "base"), (good, "random_fraction-0.5"))}
    out = main(*args)
    assert "4 tasks, 2 complete, 2 to run" in out
    again = _submitted(out)
    assert set(again) == {bad, slow}
    _wait("the resubmitted captions task", lambda: _record(res, bad).get("state") == "done", 90)
    assert _status(main, grid)[bad][0] == "done"
    for t, v in ((base, "base"), (good, "random_fraction-0.5")):
        assert (sub / v / "evaluate.done.json").stat().st_mtime_ns == done_before[t], f"{t} ran again"
    slurm.run("scancel", again[slow][0])
    slurm.wait_idle(60)
    elapsed = time.monotonic() - t_start
    assert elapsed < 180, f"the real-SLURM test took {elapsed:.0f} s (budget 180 s)"


def test_a_running_record_whose_process_is_gone_reads_interrupted(tmp_path):
    """No SLURM needed: the record says 'running' but its process has ended (SIGKILL skips the
    task's own failure handler), so --status must not keep saying 'running'."""
    from experiments import tasks as ex
    from experiments.grid import load_experiment
    from pipeline import io

    exp = load_experiment(str(_grid(tmp_path)))
    task = ex.all_tasks(exp)[0]
    cfg = ex.task_config(exp, task)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"task": task.name, "state": "running", "pid": gone.pid, "host": socket.gethostname()}
    io.save_json(ex.status_path(cfg, task), record)
    state = ex.task_state(exp, task)
    assert state["state"] == "interrupted" and str(gone.pid) in state["error"]
    io.save_json(ex.status_path(cfg, task), dict(record, pid=os.getpid()))  # this process is alive
    assert ex.task_state(exp, task)["state"] == "running"
    io.save_json(ex.status_path(cfg, task), dict(record, host="another-node"))  # cannot tell from here
    assert ex.task_state(exp, task)["state"] == "running"
