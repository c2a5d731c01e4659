"""Config: defaults reproduce the paper, files and flags override, bad keys/types are named."""
import pytest

from pipeline.cli import build_parser, config_from_args
from pipeline.config import Config, config_from_dict, load_config, to_toml
from pipeline.errors import UserError


def test_defaults_are_brain_diffuser_constants():
    cfg = Config()
    assert (cfg.ridge.alpha_vdvae, cfg.ridge.alpha_cliptext, cfg.ridge.alpha_clipvision) == (5e4, 1e5, 6e4)
    assert cfg.ridge.fmri_scale == 300.0 and cfg.ridge.rescale is True
    assert cfg.features.vdvae_groups == 31 and cfg.features.vdvae_batch_size == 30
    v = cfg.versatile
    assert (v.strength, v.num_inference_steps, v.guidance_scale, v.mix_text) == (0.75, 50, 7.5, 0.4)
    assert v.reference_offset is True
    assert cfg.nsd.n_sessions == 37 and cfg.run.subjects == ["1", "2", "5", "7"]
    assert cfg.vdvae_init.output_size == 512


def test_file_then_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[ridge]\nalpha_vdvae = 1000\n[run]\nsubjects = ["3"]\n')
    cfg = load_config([f], ["ridge.alpha_vdvae=7e4", "run.subjects=1,2", "versatile.fp16=false"])
    assert cfg.ridge.alpha_vdvae == 7e4 and isinstance(cfg.ridge.alpha_vdvae, float)
    assert cfg.run.subjects == ["1", "2"]
    assert cfg.versatile.fp16 is False
    assert load_config([f]).ridge.alpha_vdvae == 1000.0


@pytest.mark.parametrize("text, needle", [
    ("[ridge]\nalpa = 3\n", "ridge.alpa"),
    ("[ridgee]\nalpha_vdvae = 3\n", "[ridgee]"),
    ('[ridge]\nalpha_vdvae = "big"\n', "ridge.alpha_vdvae"),
    ("[versatile]\nnum_inference_steps = 2.5\n", "versatile.num_inference_steps"),
    ("[run]\nsubjects = 1\n", "run.subjects"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        load_config([f])
    assert needle in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="nope.toml: config file not found"):
        load_config([tmp_path / "nope.toml"])
    bad = tmp_path / "broken.toml"
    bad.write_text("[ridge\n")
    with pytest.raises(UserError, match="broken.toml: invalid TOML"):
        load_config([bad])
    with pytest.raises(UserError, match="section.key=value"):
        load_config([], ["alpha=3"])


def test_round_trip_through_toml_and_dict(tmp_path):
    cfg = load_config([], ["ridge.alpha_vdvae=123", "things.rois=V1,V2", "run.device=cuda:1"])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    again = load_config([f])
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.digest() == again.digest() and cfg.digest(["ridge"]) != Config().digest(["ridge"])


def test_flags_override_files_and_set_overrides_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[paths]\nresults_dir = "from_file"\n')
    args = build_parser("nsd").parse_args(["--config", str(f), "--results-dir", "from_flag", "--subject", "2",
                                           "--subject", "5", "--set", "run.subjects=7", "--raw-dir", "/raw",
                                           "--tiny", "--reference-rng"])
    cfg = config_from_args(args, "nsd")
    assert cfg.paths.results_dir == "from_flag"
    assert cfg.run.subjects == ["7"]
    assert cfg.nsd.raw_dir == "/raw" and cfg.run.dataset == "nsd" and cfg.run.tiny_models
    assert cfg.versatile.reference_rng is True


# ---------------------------------------------------------------------------------------------
# value ranges, choices and safe names (issue 18): checked on load, before any step runs


@pytest.mark.parametrize("override, needle", [
    ("versatile.batch_size=0", "versatile.batch_size: expected an integer >= 1, got 0"),
    ("synthetic.n_train=0", "synthetic.n_train: expected an integer >= 2, got 0"),
    ("versatile.strength=1.5", "versatile.strength: expected a number in (0, 1]"),
    ("versatile.mix_text=-0.1", "versatile.mix_text: expected a number in [0, 1]"),
    ("evaluate.profile=foo", "evaluate.profile: expected braindiffuser or mindeye, got 'foo'"),
    ("versatile.text_features=maybe", "versatile.text_features"),
    ("ridge.alpha_vdvae=-1", "ridge.alpha_vdvae: expected a number > 0"),
    ("ridge.cv_alphas=1,0", "ridge.cv_alphas"),
    ("run.device=gpu0", "run.device"),
    ("run.dataset=imagenet", "run.dataset"),
    ("nsd.n_sessions=41", "nsd.n_sessions: expected an integer in 1..40"),
    ("evaluate.images=versatile,pixels", "evaluate.images"),
    ("ridge.weights_dtype=int8", "ridge.weights_dtype"),
])
def test_out_of_range_values_and_unknown_choices_name_the_key(override, needle):
    with pytest.raises(UserError) as err:
        load_config([], [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["run.subjects=../../../outside", "run.subjects=1,a/b", "run.variant=..",
                                      "run.variant=.hidden", "run.variant=a b", "run.subjects="])
def test_names_that_could_leave_their_folder_are_refused(override):
    with pytest.raises(UserError, match="not a safe name|run.subjects"):
        load_config([], [override])


def test_defaults_every_config_file_and_usual_names_pass_validation():
    from pathlib import Path

    from pipeline.config import check_name, validate

    validate(Config())
    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.toml")):
        load_config([path], [])
    for name in ("1", "AM", "01", "sub-01", "random_fraction-0.25_draw-1", "settings_mix_text-0.99",
                 "ai_captions_captioner-template_prompt-low_short", "settings_strength-1e-05"):
        assert check_name(name, "name") == name
    cfg = load_config([], ["versatile.strength=1", "versatile.mix_text=0", "run.device=cuda:1"])
    assert cfg.versatile.strength == 1.0 and cfg.run.device == "cuda:1"
