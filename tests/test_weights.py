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


def test_check_names_every_missing_model(tmp_path, capsys):
    from models import weights

    assert weights.main(["--weights-dir", str(tmp_path), "--check"]) == 2
    out, err = capsys.readouterr()
    assert "imagenet64-iter-1600000-model-ema.th" in out and "clip-vit-large-patch14" in out
    assert "versatile-diffusion" in out and "alexnet-owt-7be5be79.pth" in out
    assert "4 model(s) not loadable" in err


def test_check_loads_models_saved_in_the_expected_layout(tmp_path):
    """Tiny CLIP and Versatile Diffusion saved where [models] expects them load through --check."""
    from models import versatile, weights
    from models.clip import CLIPEmbedder

    CLIPEmbedder.tiny(seed=0).save_pretrained(tmp_path / "clip-vit-large-patch14")
    versatile.save_versatile(versatile.tiny_versatile(seed=0), tmp_path / "versatile-diffusion")
    results = dict(weights.check(tmp_path, only=["clip", "versatile"]))
    assert results["clip"].startswith("ok: text (1, 77, 32), vision 257 tokens")
    assert results["versatile"].startswith("ok: image UNet")
