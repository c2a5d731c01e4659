"""Experiment grids: expansion, idempotent tasks through submitit, rerun of exactly what is missing."""
import os
import textwrap

import numpy as np
import pytest

import re_recon_main
from experiments import builders, grid
from experiments import tasks as ex
from pipeline.errors import UserError

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, body: str):
    path = tmp_path / "grid.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_grid_expansion_names_and_overrides(tmp_path):
    path = _write(tmp_path, """
        [experiment]
        dataset = "synthetic"
        subjects = ["1", "2"]
        [[variants]]
        method = "random"
        fraction = [0.5, 0.25]
        draw = [0, 1]
        [[variants]]
        method = "settings"
        "versatile.mix_text" = [0.0, 0.99]
        [[variants]]
        method = "settings"
        "versatile.strength" = 0.123456789
    """)
    exp = grid.load_experiment(str(path))
    names = [v.name for v in exp.variants]
    assert names[0] == "base" and len(names) == 1 + 4 + 2 + 1
    assert "random_fraction-0.25_draw-1" in names and "settings_mix_text-0.99" in names
    tasks = ex.all_tasks(exp)
    assert len(tasks) == 16 and tasks[0].name == "sub1__base"
    mix = next(v for v in exp.variants if v.name == "settings_mix_text-0")
    cfg = ex.task_config(exp, grid.Task(exp.name, "1", mix))
    assert cfg.versatile.mix_text == 0.0 and cfg.run.variant == "settings_mix_text-0"
    precise = next(v for v in exp.variants if v.name.startswith("settings_strength"))
    assert ex.task_config(exp, grid.Task(exp.name, "1", precise)).versatile.strength == 0.123456789  # not rounded


@pytest.mark.parametrize("body, needle", [
    ('[experiment]\ndataset = "synthetic"\n[[variants]]\nmethod = "nope"\n', "method 'nope' unknown"),
    ('[experiment]\nsubjects = ["1"]\n', "needs a dataset"),
    ('[experiment]\ndataset = "synthetic"\n[extra]\na = 1\n', "unknown section"),
])
def test_bad_experiment_files(tmp_path, body, needle):
    with pytest.raises(UserError, match=needle):
        grid.load_experiment(str(_write(tmp_path, body)))


def test_unknown_experiment_lists_known_ones():
    with pytest.raises(UserError, match="dropout_demo"):
        grid.load_experiment("no_such_experiment")


def test_grid_runs_once_and_reruns_only_what_is_missing(tmp_path, capsys):
    path = _write(tmp_path, f"""
        [experiment]
        dataset = "synthetic"
        subjects = ["1", "2"]
        configs = ["{ROOT}/configs/demo.toml"]
        methods = ["braindiffuser", "icnn"]
        [set]
        "icnn.n_iter" = 3
        "icnn.image_size" = 32
        "paths.data_dir" = "{tmp_path}/data"
        "paths.results_dir" = "{tmp_path}/res"
        "synthetic.n_train" = 30
        "synthetic.n_test" = 3
        "synthetic.image_size" = 64
        "versatile.num_inference_steps" = 4
        [[variants]]
        method = "random"
        fraction = 0.5
    """)
    args = [str(path), "--executor", "debug", "--no-progress"]
    assert re_recon_main.main(args) == 0
    out = capsys.readouterr().out
    assert "4 tasks, 0 complete, 4 to run" in out
    assert out.index("sub1__base") < out.index("sub2__base") < out.index("sub1__random")  # base tasks first
    sub1 = tmp_path / "res" / "synthetic" / "sub1"
    kept = np.load(sub1 / "random_fraction-0.5" / "variant" / "train_indices.npy")
    assert len(kept) == 15 and len(np.unique(kept)) == 15
    # the variant re-used the base features: it has no features of its own
    assert not (sub1 / "random_fraction-0.5" / "features").exists()
    report = tmp_path / "res" / "experiments" / "grid"
    assert (report / "metrics_summary.csv").is_file() and (report / "fraction_versatile.png").is_file()
    assert (report / "fraction_comparison.png").is_file()  # Brain-Diffuser and iCNN on the same axes
    assert len(list((sub1 / "random_fraction-0.5" / "images" / "icnn").glob("*.png"))) == 3
    assert (report / "grid_sub1.png").is_file()

    assert re_recon_main.main(args) == 0
    assert "4 tasks, 4 complete, 0 to run" in capsys.readouterr().out

    (sub1 / "random_fraction-0.5" / "images" / "versatile" / "0001.png").unlink()
    assert re_recon_main.main(args + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "4 tasks, 3 complete, 1 to run" in dry and "sub1__random_fraction-0.5" in dry
    assert re_recon_main.main(args) == 0
    assert "1 to run" in capsys.readouterr().out
    assert re_recon_main.main(args + ["--status"]) == 0
    status = capsys.readouterr().out
    assert status.count(" done ") == 4 and status.count("_log.err") == 4  # each task's own log file


def test_failed_task_outcome_comes_from_the_task_record(tmp_path, capsys):
    """A task that fails in its subprocess (local executor) is reported from the project's JSON task
    record, in one line, and the grid exits with code 2."""
    (tmp_path / "afile").write_text("x")
    path = _write(tmp_path, f"""
        [experiment]
        dataset = "synthetic"
        subjects = ["1"]
        configs = ["{ROOT}/configs/demo.toml"]
        [set]
        "paths.data_dir" = "{tmp_path}/afile/data"
        "paths.results_dir" = "{tmp_path}/res"
    """)
    assert re_recon_main.main([str(path), "--executor", "local", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip() and not ln[:2].isdigit()]
    assert err[-1].startswith("error: 1 task(s) failed, e.g. sub1__base:") and "afile" in err[-1]
    record = tmp_path / "res" / "experiments" / "grid" / "tasks" / "sub1__base.json"
    import json

    assert json.loads(record.read_text())["state"] == "failed"
    # status and dry-run read only the project's JSON records: submitit's pickles can go
    pickles = list((tmp_path / "res" / "experiments" / "grid" / "logs").rglob("*.pkl"))
    assert pickles
    for p in pickles:
        p.unlink()
    assert re_recon_main.main([str(path), "--status"]) == 0
    status = capsys.readouterr().out
    assert "sub1__base" in status and " failed " in status and "UserError: " in status  # data dir under a file
    assert re_recon_main.main([str(path), "--dry-run"]) == 0
    assert "1 tasks, 0 complete, 1 to run" in capsys.readouterr().out


def test_inline_executor_runs_the_grid_in_this_process_and_records_failures(tmp_path, capsys):
    """``inline`` (the demo grids' executor) runs base tasks first, one after another here; a failed
    task is recorded, does not stop the others, and the grid exits with code 2."""
    (tmp_path / "afile").write_text("x")
    path = _write(tmp_path, f"""
        [experiment]
        dataset = "synthetic"
        subjects = ["1", "2"]
        configs = ["{ROOT}/configs/demo.toml"]
        [set]
        "paths.data_dir" = "{tmp_path}/afile/data"
        "paths.results_dir" = "{tmp_path}/res"
        [[variants]]
        method = "random"
        fraction = 0.5
        [executor]
        name = "inline"
    """)
    assert re_recon_main.main([str(path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    ran = [ln.split()[1] for ln in captured.out.splitlines() if ln.startswith("running ")]
    assert ran == ["sub1__base", "sub2__base", "sub1__random_fraction-0.5", "sub2__random_fraction-0.5"]
    assert captured.err.count("FAILED    ") == 4 and "error: 4 task(s) failed, e.g. sub1__base:" in captured.err
    assert re_recon_main.main([str(path), "--status"]) == 0
    status = capsys.readouterr().out
    assert status.count(" failed ") == 4 and "inline-" not in status  # no log file: it went to this terminal
    assert not (tmp_path / "res" / "experiments" / "grid" / "logs").exists()  # no submitit folder

    path.write_text(path.read_text().replace('name = "inline"', 'name = "threads"'))
    assert re_recon_main.main([str(path)]) == 2
    assert "[executor] name = 'threads'; expected one of inline, local, slurm, debug" in capsys.readouterr().err


def test_variant_keys_names_and_values_are_checked_when_the_file_is_read(tmp_path):
    head = '[experiment]\ndataset = "synthetic"\n[[variants]]\n'
    for body, needle in [('method = "random"\nfractoin = 0.5\n', "unknown key.*fractoin.*known: fraction"),
                         ('method = "settings"\nname = ".."\n', "not a safe name"),
                         ('method = "settings"\n"versatile.strenght" = 0.5\n', "unknown key versatile.strenght"),
                         ('method = "settings"\n"versatile.mix_text" = 1.5\n', "versatile.mix_text: expected")]:
        with pytest.raises(UserError, match=needle):
            grid.load_experiment(str(_write(tmp_path, head + body)))
    with pytest.raises(UserError, match="experiment name"):
        bad = tmp_path / ".hidden.toml"
        bad.write_text(head + 'method = "settings"\n')
        grid.load_experiment(str(bad))


def test_slurm_path_up_to_submission(tmp_path):
    """The SLURM resources reach submitit's AutoExecutor; its debug back end runs the submission."""
    settings = {"name": "slurm", "max_parallel": 1, "partition": "gpu", "gpus": 2, "cpus": 4, "time": 30, "mem": 16}
    params = re_recon_main.slurm_parameters(settings)
    assert params == {"timeout_min": 30, "gpus_per_node": 2, "cpus_per_task": 4, "mem_gb": 16,
                      "name": "recon-diffuser", "slurm_partition": "gpu"}
    executor = re_recon_main.make_executor(settings, tmp_path / "logs", cluster="debug")
    job = executor.submit(sum, [1, 2, 3])
    assert job.result() == 6


def test_generating_builders_for_captions_and_perturbations(tmp_path):
    """The ai_captions (offline template captioner) and perturbed builders make their files on first use."""
    from pipeline.config import load_config
    from pipeline.layout import Layout
    from prepare_data.synthetic import prepare_subject

    cfg = load_config([], [f"paths.data_dir={tmp_path}", "run.dataset=synthetic", "models.mode=random-tiny",
                           "run.device=cpu"])
    layout = Layout(cfg, "1", "v")
    prepare_subject(layout.data_dir, "1", n_train=6, n_test=2, n_voxels=8, image_size=32)
    caps = builders.BUILDERS["ai_captions"](layout, cfg, prompt="low_short")["captions"]
    assert caps.shape == (6, 1) and all("surrounded by" in c for c in caps[:, 0])
    assert (tmp_path / "synthetic" / "ai_captions" / "template" / "generate_log.jsonl").is_file()
    again = builders.BUILDERS["ai_captions"](layout, cfg, prompt="low_short")["captions"]
    np.testing.assert_array_equal(caps, again)
    stim = builders.BUILDERS["perturbed"](layout, cfg, mode="adversarial", attack="fgsm", eps=0.03)["stim_clipvision"]
    assert stim.dtype == np.uint8 and stim.shape[0] == 6 and stim.shape[-1] == 3
