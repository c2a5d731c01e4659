"""`make demo-models` at a smoke scale: its weights load through the demo's loaders, and the run is
bitwise reproducible whether or not the AutoencoderKL and VDVAE train in their own processes."""
import dataclasses
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
    for bad in ("no_such_field=1", "parallel=maybe", "unet_t_power=0", "unet_object_weight=-1",
                "vdvae_kl_warmup=1.5"):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path), "--set", bad])
        assert e.value.code == 2
        assert bad.split("=")[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_data_parallel_unet_takes_the_one_process_step():
    """Two gloo ranks of half a batch each must train the UNet as one process does on the full
    batch: same logged losses, and weights that differ by rounding only (a rank training on the
    wrong slice, or gradients summed instead of averaged, moves them as far as training does)."""
    import numpy as np
    import torch

    cfg = train.TrainConfig(unet_batch=8, unet_steps=12, ema=0.0, unet_threads=1)
    g = torch.Generator().manual_seed(0)
    n = 32
    conditions = torch.randn(n, 257, 32, generator=g), torch.randn(n, 77, 32, generator=g)
    start = miniature.build_versatile(seed=0)
    side = 64 // start.vae_scale_factor  # the miniature's latents at 64 px
    latents = torch.randn(n, 4, side, side, generator=g), 0.1 * torch.rand(n, 4, side, side, generator=g)
    clip = miniature.build_clip(seed=0)
    init = {k: v.clone() for k, v in start.image_unet.state_dict().items()}
    out = {}
    for ranks in (1, 2):
        comps = miniature.build_versatile(seed=0)
        comps, run = train.train_unet(dataclasses.replace(cfg, unet_ranks=ranks), comps, clip, conditions,
                                      latents, cfg.unet_steps, np.random.default_rng(0))
        out[ranks] = comps.image_unet.state_dict(), [c["mse"] for c in run.curve]
    (w1, loss1), (w2, loss2) = out[1], out[2]
    assert len(loss1) == len(loss2) == cfg.unet_steps
    assert loss1 == pytest.approx(loss2, rel=1e-3)
    moved = torch.cat([(w1[k] - init[k]).flatten() for k in init]).norm()
    apart = torch.cat([(w1[k] - w2[k]).flatten() for k in init]).norm()
    assert moved > 0.1
    assert apart < 1e-3 * moved  # measured 3e-6 of 1.09 after 12 steps


def test_unet_timestep_power_shifts_training_toward_high_noise():
    """``unet_t_power`` > 1 draws the UNet's training timesteps with a density rising with t (the
    img2img steps that must take the shape from the condition); 1 is the former uniform draw."""
    import numpy as np
    import torch

    n, t_max = 4000, 800
    stats = torch.zeros(2, 3), torch.ones(2, 3)
    data = {"mean": torch.zeros(n, 4, 1, 1), "std": torch.zeros(n, 4, 1, 1), "vision": torch.zeros(n, 2, 3),
            "text": torch.zeros(n, 2, 3), "v_unc": torch.zeros(2, 3), "t_unc": torch.zeros(2, 3),
            "v_stats": stats, "t_stats": stats}
    ac = torch.linspace(0.999, 0.01, 1000)
    ts = {}
    for power in (1.0, 2.0):
        cfg = train.TrainConfig(unet_batch=n, unet_t_max=t_max, unet_t_power=power)
        t = train._unet_batch(cfg, data, ac, np.random.default_rng(0), torch.Generator().manual_seed(0))[1]
        assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < t_max
        ts[power] = t.double()
    # uniform: mean (t_max - 1) / 2, a quarter above 600; density ∝ t: mean 2/3 t_max, 1 - (600/800)^2 above 600
    assert float(ts[1.0].mean()) == pytest.approx(399.5, abs=12)
    assert float((ts[1.0] >= 600).double().mean()) == pytest.approx(0.25, abs=0.025)
    assert float(ts[2.0].mean()) == pytest.approx(533.3, abs=12)
    assert float((ts[2.0] >= 600).double().mean()) == pytest.approx(0.4375, abs=0.025)


def test_object_weights_mark_the_outline_only():
    """A 32 px square at pixels 16-47 of a 64 px image covers latent pixels 4-11 of 16 exactly: the
    outline weight (3x3 max minus 3x3 min of the coverage) is 1 + weight on rows/columns 3-4 and
    11-12 of its ring, 1 in the interior (5-10) and far outside; a uniform image has no outline."""
    import numpy as np

    img = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    img[:] = (20, 40, 200)
    img[0, 16:48, 16:48] = (250, 200, 0)
    w = train.object_weights(img, 16, 4.0)
    assert w.shape == (2, 1, 16, 16)
    ring = np.zeros((16, 16), dtype=bool)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False
    np.testing.assert_allclose(w[0, 0][ring], 5.0)
    np.testing.assert_allclose(w[0, 0][~ring], 1.0)
    np.testing.assert_allclose(w[1], 1.0)


def test_unet_object_weight_changes_the_training_step():
    """``unet_object_weight`` > 0 weighs the UNet's loss by ``object_weights`` (a tried and not adopted
    setting, README): the same seed then takes other steps, while the logged loss stays the plain MSE
    of the same batches' predictions (equal at the first step, before the weights part)."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    n = 16
    conditions = torch.randn(n, 257, 32, generator=g), torch.randn(n, 77, 32, generator=g)
    side = 64 // miniature.build_versatile(seed=0).vae_scale_factor
    latents = torch.randn(n, 4, side, side, generator=g), 0.1 * torch.rand(n, 4, side, side, generator=g)
    images = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    images[:, 16:48, 16:48] = 255
    clip = miniature.build_clip(seed=0)
    out = {}
    for weight in (0.0, 4.0):
        cfg = train.TrainConfig(unet_batch=4, unet_steps=4, ema=0.0, unet_ranks=1, unet_threads=1,
                                unet_object_weight=weight)
        comps, run = train.train_unet(cfg, miniature.build_versatile(seed=0), clip, conditions, latents,
                                      cfg.unet_steps, np.random.default_rng(0), images)
        out[weight] = comps.image_unet.state_dict(), [c["mse"] for c in run.curve]
    (w0, l0), (w4, l4) = out[0.0], out[4.0]
    assert l0[0] == pytest.approx(l4[0], rel=1e-6)
    assert any(not torch.equal(w0[k], w4[k]) for k in w0)


def test_vdvae_kl_warmup_ramps_the_rate_weight_then_trains_the_plain_elbo():
    """``vdvae_kl_warmup`` = 0.5 of 8 steps weighs the KL term i / 4 at step i (0, .25, .5, .75, then 1),
    so the same seed takes other steps than the plain ELBO (0), while the logged ELBO stays the full
    one (equal at the first step, before any update)."""
    import numpy as np
    import torch

    side = miniature.build_vdvae().config.image_size
    small = np.random.default_rng(0).integers(0, 256, (32, side, side, 3), dtype=np.uint8)
    out = {}
    for warm in (0.0, 0.5):
        cfg = train.TrainConfig(vdvae_batch=2, vdvae_kl_warmup=warm, ema=0.0)
        model, run = train.train_vdvae(cfg, small, 8, np.random.default_rng(0))
        out[warm] = model.state_dict(), run.curve
    (w0, c0), (w5, c5) = out[0.0], out[0.5]
    assert [c["kl_weight"] for c in c5] == pytest.approx([0, .25, .5, .75, 1, 1, 1, 1])
    assert [c["kl_weight"] for c in c0] == pytest.approx([1] * 8)
    assert c0[0]["elbo"] == pytest.approx(c5[0]["elbo"], rel=1e-6)
    assert c5[0]["elbo"] == pytest.approx(c5[0]["distortion"] + c5[0]["rate"], rel=1e-5)
    assert any(not torch.equal(w0[k], w5[k]) for k in w0)
