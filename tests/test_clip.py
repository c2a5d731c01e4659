"""CLIP tokenizer and embedder on tiny random towers of the real architectures (offline)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from models.clip import (
    ROUND_TRIP_LUT,
    UNCOND_GRAY_VALUE,
    CLIPEmbedder,
    images_without_captions,
    reference_image,
)
from models.clip_tokenizer import EOS_ID, VOCAB_SIZE, build_clip_tokenizer
from pipeline.errors import UserError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = [
    "a photo of a cat",
    "A man, riding a horse... on the beach!! (2 dogs; 10% off?)",
    "Café crème brûlée, naïve façade — Zürich",
    "“Curly” quotes and it’s fine",
    "don't you're we've I'm they'll he'd",
    "",
    "word " * 100,  # truncated: 75 tokens + BOS + EOS
]


@pytest.fixture(scope="module")
def emb():
    return CLIPEmbedder.tiny(seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, size=(3, 425, 425, 3), dtype=np.uint8)


def _first_eos(ids: torch.Tensor) -> torch.Tensor:
    return (ids == EOS_ID).int().argmax(dim=-1)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_matches_open_clip(emb):
    import open_clip

    ref = open_clip.get_tokenizer("ViT-L-14")(PROMPTS)
    ids = emb.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    for i in range(len(PROMPTS)):
        n = int((ref[i] != 0).sum())  # open_clip pads with 0, the HF tokenizer with EOS
        assert torch.equal(ids[i, :n], ref[i, :n]), PROMPTS[i]
        assert (ids[i, n:] == EOS_ID).all()
    assert emb.tokenizer.pad_token_id == EOS_ID == 49407
    assert len(emb.tokenizer) == VOCAB_SIZE


def test_tokenizer_cache_dir_round_trip(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == VOCAB_SIZE and vocab["<|endoftext|>"] == EOS_ID and vocab["<|startoftext|>"] == 49406
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    again = build_clip_tokenizer(tmp_path)  # from the cached files
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for t in (again, loaded):
        assert t(PROMPTS[:5]).input_ids == tok(PROMPTS[:5]).input_ids


# ---------------------------------------------------------------- text
def test_encode_text_matches_raw_transformers(emb):
    import open_clip

    z = emb.encode_text(PROMPTS[:3])
    assert z.shape == (3, 77, emb.dim) and z.dtype == torch.float32
    # independent: open_clip ids into the raw model; the library's own pooled projection (text_embeds)
    ids = open_clip.get_tokenizer("ViT-L-14")(PROMPTS[:3])
    ids = torch.where(ids == 0, torch.full_like(ids, EOS_ID), ids)
    with torch.no_grad():
        out = emb.text_model(input_ids=ids)
    tokens = out.last_hidden_state @ emb.text_model.text_projection.weight.T
    expected = tokens / out.text_embeds.norm(dim=-1)[:, None, None]
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    eos = _first_eos(ids)
    np.testing.assert_allclose(z[torch.arange(3), eos].norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    # rows other than EOS are not unit-norm: one scalar per caption, not per token
    assert not torch.allclose(z[0, 1].norm(), torch.tensor(1.0), atol=1e-3)


def test_captions_per_image_average_and_batching(emb):
    caps = np.array([
        ["a cat on a mat", "", "two cats"],
        ["", "", ""],
        ["a red bus", "a bus.", "  "],
        ["one dog", "a dog running", "dog!"],
    ])
    out, missing = emb.encode_captions_per_image(caps, batch_size=3, return_missing=True)
    assert out.shape == (4, 77, emb.dim) and out.dtype == np.float32
    assert missing.tolist() == [False, True, False, False]
    assert images_without_captions(caps).tolist() == missing.tolist()
    # '' and blank captions are skipped, the rest averaged
    for i, present in {0: ["a cat on a mat", "two cats"], 2: ["a red bus", "a bus."],
                       3: ["one dog", "a dog running", "dog!"]}.items():
        np.testing.assert_allclose(out[i], emb.encode_text(present).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # an image without captions gets the empty-prompt embedding
    np.testing.assert_allclose(out[1], emb.unconditional_text().numpy(), rtol=1e-6, atol=1e-7)
    # batching several images together = encoding each image alone
    one_by_one = np.stack([emb.encode_captions_per_image(caps[i:i + 1], batch_size=1) for i in range(4)])[:, 0]
    np.testing.assert_allclose(out, one_by_one, rtol=1e-5, atol=1e-6)
    big = emb.encode_captions_per_image(caps, batch_size=100)
    np.testing.assert_allclose(big, one_by_one, rtol=1e-5, atol=1e-6)


def test_captions_bad_input(emb):
    with pytest.raises(UserError, match="2-D string array"):
        emb.encode_captions_per_image(np.array(["a", "b"]))
    with pytest.raises(UserError, match="out"):
        emb.encode_captions_per_image(np.array([["a"]]), out=np.zeros((2, 77, emb.dim), np.float32))


# ---------------------------------------------------------------- vision pixels
def test_round_trip_lut_equals_reference_ops():
    import torchvision.transforms.functional as TF

    v = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = TF.to_tensor(Image.fromarray(v)).float() * 2 - 1  # reference dataset
    x = ((x + 1) / 2).numpy().transpose(1, 2, 0)  # clip_encode_vision
    expected = (x * 255).astype(np.uint8)[..., 0].ravel()  # transformers 4.19 to_pil_image
    np.testing.assert_array_equal(ROUND_TRIP_LUT, expected)
    # the documented consequence: float32 rounding lowers exactly the values 1..63 by one
    changed = np.flatnonzero(ROUND_TRIP_LUT != np.arange(256))
    np.testing.assert_array_equal(changed, np.arange(1, 64))
    assert (np.arange(256)[changed] - ROUND_TRIP_LUT[changed] == 1).all()


def _hand_pixels(image: np.ndarray, size: int, reference: bool) -> np.ndarray:
    """Independent preprocessing: PIL bilinear 512, float round trip, PIL bicubic shortest side, crop, normalise."""
    pil = Image.fromarray(image)
    if reference:
        pil = pil.resize((512, 512), Image.BILINEAR)
        x = np.asarray(pil).astype(np.float32) / np.float32(255)
        x = ((x * 2 - 1) + 1) / 2
        pil = Image.fromarray((x * 255).astype(np.uint8))
    w, h = pil.size
    s = size / min(w, h)
    pil = pil.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(pil)[top:top + size, left:left + size].astype(np.float32) / 255
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def test_pixel_values_match_hand_computation(emb, images):
    px = emb.pixel_values(images)
    assert px.shape == (3, 3, 32, 32) and px.dtype == torch.float32
    for i in range(3):
        np.testing.assert_allclose(px[i].numpy(), _hand_pixels(images[i], 32, True), atol=1e-5)
    # ViT-L/14 processor settings (224 bicubic + crop) on a real-size stimulus and a non-square one
    from transformers import CLIPImageProcessorPil

    real = CLIPImageProcessorPil()
    px224 = real(images=[reference_image(images[0])], return_tensors="pt").pixel_values[0]
    np.testing.assert_allclose(px224.numpy(), _hand_pixels(images[0], 224, True), atol=1e-5)
    wide = np.random.RandomState(1).randint(0, 256, size=(240, 300, 3), dtype=np.uint8)
    px_wide = real(images=[reference_image(wide, reference_resize=False)], return_tensors="pt").pixel_values[0]
    np.testing.assert_allclose(px_wide.numpy(), _hand_pixels(wide, 224, False), atol=1e-5)


def test_bad_images_raise(emb):
    with pytest.raises(UserError, match="uint8"):
        emb.encode_images(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        emb.encode_images(np.zeros((8, 8, 3), np.uint8))


# ---------------------------------------------------------------- vision embedding
def test_encode_images_matches_manual_computation(emb, images):
    z = emb.encode_images(images, batch_size=2)
    assert z.shape == (3, 257, emb.dim) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z[:, 0], axis=-1), 1.0, rtol=1e-5)
    vm = emb.vision_model
    px = torch.from_numpy(np.stack([_hand_pixels(im, 32, True) for im in images]))
    with torch.no_grad():
        out = vm(pixel_values=px, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # encoder output, before the post-LayerNorm
    ln = vm.vision_model.post_layernorm
    normed = F.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    tokens = normed @ vm.visual_projection.weight.T
    expected = tokens / tokens[:, :1].norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(z, expected.numpy(), rtol=1e-4, atol=1e-5)
    # CLS row points along the library's own pooled image embedding
    cls_dir = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(z[:, 0], cls_dir.numpy(), rtol=1e-4, atol=1e-5)
    # batch size does not matter (beyond float noise); out= fills a given array
    filled = np.zeros_like(z)
    emb.encode_images(list(images), batch_size=3, out=filled)
    np.testing.assert_allclose(filled, z, rtol=1e-4, atol=1e-5)


def test_unconditional_contexts(emb):
    ut = emb.unconditional_text()
    np.testing.assert_allclose(ut.numpy(), emb.encode_text([""])[0].numpy())
    assert ut.shape == (77, emb.dim)
    ui = emb.unconditional_image()
    assert ui.shape == (257, emb.dim)
    torch.testing.assert_close(ui[0].norm(), torch.tensor(1.0))
    gray = np.full((1, 224, 224, 3), 127, np.uint8)
    px = emb.pixel_values(gray, reference_resize=False)
    expected = (np.float32(UNCOND_GRAY_VALUE / 255) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(px[0].numpy(), np.broadcast_to(expected[:, None, None], px[0].shape), atol=1e-6)
    torch.testing.assert_close(ui, emb.encode_pixels(px)[0])
    # the value is the reference's zeros-in-[-1,1] image after (x+1)/2, *255 and uint8 truncation
    assert int((((torch.zeros(1) + 1) / 2).numpy() * 255).astype(np.uint8)[0]) == UNCOND_GRAY_VALUE


# ---------------------------------------------------------------- construction, saving, loading
def test_tiny_is_seeded():
    a, b, c = CLIPEmbedder.tiny(seed=3), CLIPEmbedder.tiny(seed=3), CLIPEmbedder.tiny(seed=4)
    sa, sb, sc = a.vision_model.state_dict(), b.vision_model.state_dict(), c.vision_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_round_trip(emb, images, tmp_path):
    emb.save_pretrained(tmp_path / "clip")
    assert {p.name for p in (tmp_path / "clip").iterdir()} == {"tokenizer", "text_encoder", "image_encoder",
                                                                "image_processor"}
    back = CLIPEmbedder.from_pretrained(tmp_path / "clip")
    torch.testing.assert_close(back.encode_text(PROMPTS), emb.encode_text(PROMPTS), rtol=0, atol=0)
    np.testing.assert_array_equal(back.encode_images(images), emb.encode_images(images))
    torch.testing.assert_close(back.unconditional_image(), emb.unconditional_image(), rtol=0, atol=0)


def test_load_single_clipmodel_folder(emb, images, tmp_path):
    """The layout of openai/clip-vit-large-patch14: one CLIPModel folder with tokenizer and processor files."""
    cfg = CLIPConfig(text_config=emb.text_model.config.to_dict(), vision_config=emb.vision_model.config.to_dict(),
                     projection_dim=emb.dim)
    model = CLIPModel(cfg)
    missing, unexpected = model.load_state_dict({**emb.text_model.state_dict(), **emb.vision_model.state_dict()},
                                                strict=False)
    assert missing == ["logit_scale"] and not unexpected
    model.save_pretrained(tmp_path)
    emb.tokenizer.save_pretrained(tmp_path)
    emb.image_processor.save_pretrained(tmp_path)
    back = CLIPEmbedder.from_pretrained(tmp_path)
    torch.testing.assert_close(back.encode_text(PROMPTS[:2]), emb.encode_text(PROMPTS[:2]), rtol=0, atol=0)
    np.testing.assert_array_equal(back.encode_images(images[:1]), emb.encode_images(images[:1]))


def test_missing_or_incomplete_folder_is_a_user_error(emb, tmp_path):
    with pytest.raises(UserError, match="nowhere.*hf download openai/clip-vit-large-patch14"):
        CLIPEmbedder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither a CLIPModel folder"):
        CLIPEmbedder.from_pretrained(tmp_path)  # exists but empty
    emb.save_pretrained(tmp_path / "vd")
    (tmp_path / "vd" / "image_encoder" / "model.safetensors").rename(tmp_path / "vd" / "image_encoder" / "x.bin")
    with pytest.raises(UserError, match="image_encoder.*model.safetensors.*pickle"):
        CLIPEmbedder.from_pretrained(tmp_path / "vd")
    # a text encoder without projection would leave text_projection random: refused
    emb.save_pretrained(tmp_path / "vd2")
    CLIPTextModel(emb.text_model.config).save_pretrained(tmp_path / "vd2" / "text_encoder")
    with pytest.raises(UserError, match="text_projection"):
        CLIPEmbedder.from_pretrained(tmp_path / "vd2")


def test_embeddings_equal_diffusers_versatile_diffusion_encoders():
    """Our normalised CLIP-text and CLIP-vision tokens equal diffusers' own Versatile Diffusion
    encoders (the dual-guided pipeline's ``_encode_text_prompt`` / ``_encode_image_prompt``)."""
    from types import SimpleNamespace

    from diffusers.pipelines.deprecated.versatile_diffusion.pipeline_versatile_diffusion_dual_guided import (
        VersatileDiffusionDualGuidedPipeline as VD,
    )
    from PIL import Image

    emb = CLIPEmbedder.tiny(seed=3)
    host = SimpleNamespace(tokenizer=emb.tokenizer, text_encoder=emb.text_model, image_encoder=emb.vision_model,
                           image_feature_extractor=emb.image_processor)
    prompts = ["a red square on a blue background", "two cats"]
    theirs = VD._encode_text_prompt(host, prompts, "cpu", 1, False)
    np.testing.assert_allclose(emb.encode_text(prompts).numpy(), theirs.numpy(), atol=1e-5)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    theirs = VD._encode_image_prompt(host, [Image.fromarray(i) for i in images], "cpu", 1, False)
    ours = emb.encode_pixels(emb.pixel_values(images, reference_resize=False))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
