"""The real-size rehearsal's layout part on the meta device (no tensor memory, seconds).

Every model is built at its published size from the configurations the real checkpoints have; the
configuration files are written as the real savers write them and read back by the classes the
pipeline's loaders use. The test compares, file by file, the keys and shapes the builders write
with those the loaders build, and the parameter counts with the published figures (VDVAE
ImageNet-64 exactly 125,005,860; VGG19 exactly 143,667,240; CLIP ViT-L/14 ≈ 428M; VD image +
text UNets ≈ 2.57B). The full rehearsal (real tensors, files, strict loads, one image end to end)
is ``make rehearse``.
"""
import json

import pytest

from models import rehearse
from pipeline.config import ICNNConfig, ModelsConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_layout")
    return root, rehearse.meta_layout(root)


def test_every_file_of_the_weights_layout_is_covered(layout):
    """Each weight file `make weights` fetches is a piece, or sits directly in a piece's folder."""
    from models.weights import groups

    _, lay = layout
    m = ModelsConfig()
    # icnn: checked below; vd_reference: the original-layout .pth, only converted (tests/test_vd_convert.py)
    weights = {f.key for g, files in groups().items() if g not in ("icnn", "vd_reference") for f in files
               if f.key.endswith((".th", ".pth", ".tar", ".bin", ".safetensors"))}
    folder = lambda f: f.rsplit("/", 1)[0] if "/" in f else ""  # noqa: E731
    # the VAE piece is the VD root folder (it also writes scheduler/ and model_index.json)
    uncovered = {f for f in weights if f not in lay and folder(f) not in lay
                 and folder(f) != f"{m.versatile}/vae"}
    assert not uncovered, sorted(uncovered)
    assert len(weights) == 11, sorted(weights)  # vdvae, clip, vae + 2 UNets, 6 evaluation files
    ic = ICNNConfig()
    assert ic.vgg19 in lay and ic.generator in lay


def test_written_keys_and_shapes_are_what_the_loaders_build(layout):
    _, lay = layout
    for path, (written, expected, group, _) in lay.items():
        missing = sorted(set(expected) - set(written))
        unexpected = sorted(set(written) - set(expected))
        wrong = sorted(k for k in set(written) & set(expected) if written[k] != expected[k])
        assert not (missing or unexpected or wrong), (path, missing[:3], unexpected[:3], wrong[:3])
        assert len(written) > 10, path


def test_configs_on_disk_are_the_published_architectures(layout):
    root, _ = layout
    m = ModelsConfig()
    image = json.loads((root / m.versatile / "image_unet" / "config.json").read_text())
    text = json.loads((root / m.versatile / "text_unet" / "config.json").read_text())
    vae = json.loads((root / m.versatile / "vae" / "config.json").read_text())
    assert image["block_out_channels"] == [320, 640, 1280, 1280] and image["cross_attention_dim"] == 768
    assert image["down_block_types"].count("CrossAttnDownBlock2D") == 3 and image["in_channels"] == 4
    assert text["in_channels"] == [768, 1, 1] and text["_class_name"] == "UNetFlatConditionModel"
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    clip = json.loads((root / m.clip / "config.json").read_text())
    assert clip["vision_config"]["patch_size"] == 14 and clip["vision_config"]["num_hidden_layers"] == 24
    assert clip["text_config"]["num_hidden_layers"] == 12 and clip["projection_dim"] == 768


def test_parameter_counts_match_the_published_figures(layout):
    _, lay = layout
    per_group = {}
    for path, (_, _, group, n) in lay.items():
        per_group.setdefault(group, {})[path] = n
    for group, (figure, tol, what) in rehearse.PUBLISHED.items():
        n = rehearse.published_count(group, per_group[group])
        assert abs(n - figure) <= tol * figure, (group, n, figure, what)
    assert rehearse.published_count("vdvae", per_group["vdvae"]) == 125_005_860
