"""make weights: the list of weight files and how they are fetched."""


def test_weights_fetcher_lists_every_model_and_falls_back_to_bin(tmp_path):
    """make weights: every group is listed with its URL; a missing .safetensors falls back to .bin."""
    from models import weights
    from prepare_data.download_nsd import LocalMirror, download

    groups = weights.groups()
    assert set(groups) == {"vdvae", "clip", "versatile", "eval", "icnn"}
    assert groups["vdvae"][0].key == "vdvae/imagenet64-iter-1600000-model-ema.th"
    keys = [f.key for f in groups["versatile"]]
    assert "versatile-diffusion/image_unet/diffusion_pytorch_model.safetensors" in keys
    alt = weights.bin_variant(groups["versatile"][-1])
    assert alt.key.endswith("text_unet/diffusion_pytorch_model.bin") and alt.url.endswith(".bin")
    mirror = tmp_path / "mirror"
    (mirror / alt.key).parent.mkdir(parents=True)
    (mirror / alt.key).write_bytes(b"weights")
    download([alt], tmp_path / "dest", transport=LocalMirror(mirror), progress=False)
    assert (tmp_path / "dest" / alt.key).read_bytes() == b"weights"
