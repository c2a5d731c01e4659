"""`make demo-models` at a smoke scale: its weights load through the demo's loaders, and the run is
bitwise reproducible whether or not the AutoencoderKL trains in its own process."""
import json

import pytest

import miniature
from miniature import train

pytestmark = pytest.mark.slow
SMOKE = ["--scale", "0.01", "--set", "n_pool=160", "--set", "clip_batch=32", "--set", "unet_batch=8"]


def _hashes(out):
    manifest = json.loads((out / miniature.MANIFEST).read_text())
    return {name: f["sha256"] for name, f in manifest["files"].items()}, manifest


def test_training_is_reproducible_and_loadable(tmp_path):
    a, b = tmp_path / "parallel", tmp_path / "serial"
    assert train.main(["--out", str(a), *SMOKE]) == 0
    assert train.main(["--out", str(b), *SMOKE, "--set", "parallel=false"]) == 0
    (ha, ma), (hb, mb) = _hashes(a), _hashes(b)
    assert set(ha) == set(miniature.FILES.values())
    assert ha == hb  # same seed -> same bytes, whichever schedule ran the stages
    assert ma["torch_threads"]["parallel"] and not mb["torch_threads"]["parallel"]
    assert ma["vae_scaling_factor"] == mb["vae_scaling_factor"] > 0
    assert {"clip", "vdvae", "vae", "unet"} <= set(ma["final_losses"])
    # the loaders check every file's sha256 against the manifest and load strictly
    miniature.load_vdvae(weights_dir=a)
    miniature.load_clip(weights_dir=a)
    comps = miniature.load_versatile(weights_dir=a)
    assert comps.vae.config.scaling_factor == pytest.approx(ma["vae_scaling_factor"])


def test_unknown_or_malformed_overrides_exit_2(tmp_path, capsys):
    for bad in ("no_such_field=1", "parallel=maybe"):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path), "--set", bad])
        assert e.value.code == 2
        assert bad.split("=")[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
