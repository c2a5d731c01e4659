"""Step runner and CLI: complete-or-absent, skip on rerun, --force, config changes, exit codes."""
import json

import numpy as np

from pipeline.cli import dataset_main
from pipeline.common_format import part_path, read_split, subject_dir
from pipeline.config import load_config
from pipeline.layout import Layout
from pipeline.runner import Context, is_complete, run_step, step_spec
from prepare_data.synthetic import make_synthetic
from step_context import step_context


def _cfg(tmp_path, *extra):
    return load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                            "run.dataset=synthetic", "synthetic.n_train=12", "synthetic.n_test=4",
                            "synthetic.n_voxels=20", "synthetic.image_size=16", *extra])


def test_prepare_runs_once_then_skips_and_force_redoes(tmp_path):
    cfg = _cfg(tmp_path)
    spec = step_spec("prepare")
    assert run_step(spec, step_context(cfg)) is True
    record = json.loads((subject_dir(tmp_path / "data", "synthetic", 1) / "prepare.done.json").read_text())
    assert record["step"] == "prepare" and record["config"]["synthetic"]["n_train"] == 12
    assert "numpy" in record["versions"]
    assert run_step(spec, step_context(cfg)) is False
    assert run_step(spec, step_context(cfg, force=True)) is True
    # a config change in a section the step reads makes it incomplete; other sections do not
    assert is_complete(spec, step_context(_cfg(tmp_path, "ridge.alpha_vdvae=1")))[0]
    done, reason = is_complete(spec, step_context(_cfg(tmp_path, "synthetic.noise=0.9")))
    assert not done and reason == "configuration changed"


def test_missing_output_makes_step_incomplete(tmp_path):
    cfg = _cfg(tmp_path)
    run_step(step_spec("prepare"), step_context(cfg))
    part_path(subject_dir(tmp_path / "data", "synthetic", 1), "train", "cap", 1).unlink()
    done, reason = is_complete(step_spec("prepare"), step_context(cfg))
    assert not done and "train_cap_sub1.npy" in reason


def test_synthetic_data_is_deterministic_and_shared_across_subjects():
    a_train, a_test = make_synthetic(6, 3, 10, 16, 0.5, seed=0, subject_seed=1)
    b_train, b_test = make_synthetic(6, 3, 10, 16, 0.5, seed=0, subject_seed=2)
    c_train, _ = make_synthetic(6, 3, 10, 16, 0.5, seed=0, subject_seed=1)
    np.testing.assert_array_equal(a_test.stim, b_test.stim)  # same images for every subject
    assert not np.allclose(a_train.fmri, b_train.fmri)  # different brains
    np.testing.assert_array_equal(a_train.fmri, c_train.fmri)
    assert a_test.nrep.tolist() == [3, 3, 3] and a_train.cap.dtype.kind == "U"


def test_cli_list_and_user_errors_exit_2(tmp_path, capsys):
    assert dataset_main("synthetic", ["--list"]) == 0
    assert "1. prepare" in capsys.readouterr().out
    rc = dataset_main("synthetic", ["--set", "ridge.alpa=1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --set: unknown key ridge.alpa")
    rc = dataset_main("nsd", ["--only", "prepare", "--raw-dir", str(tmp_path / "absent"),
                              "--data-dir", str(tmp_path / "d"), "--subject", "1"])
    assert rc == 2 and "absent: raw nsd folder not found" in capsys.readouterr().err


def test_cli_runs_prepare_for_two_subjects(tmp_path, caplog):
    caplog.set_level("INFO", logger="recon")
    args = ["--only", "prepare", "--data-dir", str(tmp_path / "d"), "--subject", "1", "--subject", "3",
            "--set", "synthetic.n_train=5", "--set", "synthetic.n_test=2", "--set", "synthetic.image_size=16"]
    assert dataset_main("synthetic", args) == 0
    data = read_split(subject_dir(tmp_path / "d", "synthetic", 3), "train", 3)
    assert data.stim.shape == (5, 16, 16, 3)
    assert dataset_main("synthetic", args) == 0
    assert "complete, skipping" in caplog.text


def test_synthetic_data_is_learnable():
    """A plain ridge from the synthetic fMRI predicts held-out coarse pixels well above chance."""
    from sklearn.linear_model import Ridge

    train, test = make_synthetic(160, 40, 120, 32, 0.5, seed=3, subject_seed=1)

    def coarse(stim):
        return stim.reshape(len(stim), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(stim), -1)

    pred = Ridge(alpha=10.0).fit(train.fmri / 300, coarse(train.stim)).predict(test.fmri / 300)
    r = [np.corrcoef(p, t)[0, 1] for p, t in zip(pred, coarse(test.stim))]
    assert np.mean(r) > 0.5
    assert train.cap[7, 0] != "" and any("photo" in c or "picture" in c for c in train.cap[:, 1])


def test_prepare_digest_covers_only_the_runs_own_dataset_section(tmp_path):
    """The one intended change of issue 19: another dataset's section (nsd.*, things.*) no longer
    marks a prepared subject incomplete; its own section still does."""
    cfg = _cfg(tmp_path)
    spec = step_spec("prepare")
    run_step(spec, step_context(cfg))
    assert is_complete(spec, step_context(_cfg(tmp_path, "nsd.n_sessions=40", "things.image_size=64")))[0]
    assert is_complete(spec, step_context(_cfg(tmp_path, "synthetic.noise=0.9")))[1] == "configuration changed"
    assert spec.config_digest(cfg) == cfg.digest(["run.dataset", "synthetic"])


def test_dataset_registry_drives_splits_and_cli_choices(tmp_path, capsys):
    from pipeline.common_format import PARTS
    from pipeline.config import DATASET_NAMES, dataset_splits
    from prepare_data import prepare

    assert DATASET_NAMES == ("nsd", "deeprecon", "things", "synthetic")
    deeprecon = load_config([], ["run.dataset=deeprecon"])
    assert dataset_splits(deeprecon) == ["train", "test", "art"]
    no_art = load_config([], ["run.dataset=deeprecon", "deeprecon.session_art="])
    assert dataset_splits(no_art) == ["train", "test"]
    outputs = prepare.outputs(Context(cfg=no_art, layout=Layout(no_art, "TH")))
    assert not [p for p in outputs if "_art_" in p.name] and len(outputs) == 1 + 2 * len(PARTS)
    rc = dataset_main("synthetic", ["--raw-dir", str(tmp_path), "--list-subjects"])
    assert rc == 2 and "--raw-dir: dataset 'synthetic' has no raw_dir" in capsys.readouterr().err
    assert dataset_main("synthetic", ["--list-subjects"]) == 0
    assert capsys.readouterr().out.strip() == "synthetic: any subject id (generated)"
