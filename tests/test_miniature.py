"""The trained miniature: its objective, its committed weights, and what each network learned.

Thresholds come from measurements on the committed weights (stated beside each), with margin.
"""
import math

import numpy as np
import pytest
import torch

import miniature
from models import vdvae as m
from prepare_data.synthetic import COLOURS, SHAPES, colour_pair, draw_pool


# ----------------------------------------------------------------------------- the VDVAE objective
def _logistic_cdf(x, mu, s):
    return 1.0 / (1.0 + np.exp(-(x - mu) / s))


def test_dmol_likelihood_matches_an_independent_discretised_logistic():
    """One mixture component, no colour coupling: each channel is an independent discretised
    logistic over 256 bins (edges to ±inf), so p(r, g, b) = p(r) p(g) p(b), computed here in numpy."""
    k = 1
    mu = np.array([0.1, -0.3, 0.5])
    log_s = np.array([-2.0, -3.0, -1.5])
    params = torch.zeros(1, 16, 16, 10 * k)
    rest = torch.zeros(3, 3 * k)
    rest[:, 0], rest[:, 1] = torch.tensor(mu), torch.tensor(log_s)
    params[..., k:] = rest.reshape(-1)
    values = np.arange(256)  # every red value once, green and blue fixed
    x = np.zeros((1, 16, 16, 3))
    x[..., 0] = values.reshape(16, 16)
    x[..., 1], x[..., 2] = 10, 250
    target = torch.tensor(x / 127.5 - 1.0, dtype=torch.float32)
    ll = m.dmol_log_likelihood(params, target, k).item()

    def p_bin(v, c):
        lo = -np.inf if v == 0 else (v - 0.5) / 127.5 - 1.0
        hi = np.inf if v == 255 else (v + 0.5) / 127.5 - 1.0
        s = math.exp(log_s[c])
        return _logistic_cdf(hi, mu[c], s) - _logistic_cdf(lo, mu[c], s)

    p_r = np.array([p_bin(v, 0) for v in values])
    expected = np.sum(np.log(p_r)) + 256 * (np.log(p_bin(10, 1)) + np.log(p_bin(250, 2)))
    assert p_r.sum() == pytest.approx(1.0, abs=1e-6)  # the bins cover the real line
    assert ll == pytest.approx(expected, rel=1e-4)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = (torch.randn(50, generator=g) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, lq.exp()),
                                            torch.distributions.Normal(mp, lp.exp()))
    assert torch.allclose(m.gaussian_kl(mq, lq, mp, lp), ref, atol=1e-5)


# ----------------------------------------------------------------------------- committed weights
def test_committed_weights_match_their_manifest_and_budget():
    manifest = miniature.read_manifest()
    total = 0
    for name, fname in miniature.FILES.items():
        path = miniature.WEIGHTS_DIR / fname
        assert miniature._sha256(path) == manifest["files"][fname]["sha256"], fname
        total += path.stat().st_size
    assert total <= 25 * 2**20 and total == manifest["total_bytes"]
    assert manifest["rebuild"].startswith("make demo-models") and manifest["seed"] == 0
    assert set(manifest["final_losses"]) == {"clip", "vdvae", "vae", "unet"}


@pytest.fixture(scope="module")
def fresh_images():
    """Images the miniature never saw: the pool generator with another seed."""
    stim, caps, _ = draw_pool(48, 128, seed=991)
    return stim, caps


def _pixcorr(a, b):
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_trained_vdvae_reconstructs_unseen_images(fresh_images):
    """Encode -> decode with all groups from the posterior mean: measured median PixCorr 0.79 on unseen
    images; the 7 Brain-Diffuser groups alone (prior for the last): 0.79. Threshold 0.65 for both."""
    from PIL import Image

    stim, _ = fresh_images
    model = miniature.load_vdvae()
    side = model.config.image_size
    small = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR)) for im in stim])
    n_all = len(model.config.decoder_layers())
    lat = m.extract_latents(model, stim, n_groups=n_all, posterior="mean", progress=False)
    rec = m.decode_latents(model, lat, n_groups=n_all, progress=False)
    lat7 = m.extract_latents(model, stim, posterior="mean", progress=False)
    rec7 = m.decode_latents(model, lat7, progress=False)
    assert np.median(_pixcorr(rec, small)) > 0.65
    assert np.median(_pixcorr(rec7, small)) > 0.65


def _object_mask(img):
    """Pixels far (> 60 of 255, RGB distance) from the border's median colour: the drawn object."""
    img = img.astype(np.float32)
    bg = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    return np.linalg.norm(img - bg, axis=-1) > 60


def _centred(mask):
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    return np.roll(mask, (mask.shape[0] // 2 - round(ys.mean()), mask.shape[1] // 2 - round(xs.mean())), (0, 1))


def _iou(a, b):
    union = (a | b).sum()
    return (a & b).sum() / union if union else 0.0


def test_trained_vdvae_keeps_the_shapes_through_encode_decode():
    """The 7 Brain-Diffuser groups from the posterior mean, decoded with ``pixels="mean"`` (the demo's
    init setting), on 96 unseen images (84 of them shapes). Shape read-back: the shape of the *other*
    seen image whose centred object mask overlaps the reconstruction's most (the seen images
    themselves score 84 of 84 so; the commonest shape alone would score about a third). Measured on
    the committed plain-ELBO VDVAE, whose two 16x16 groups collapsed: 46 of 84, object-mask IoU 0.517,
    median PixCorr 0.887 (thresholds 38 of 84, IoU 0.42, PixCorr 0.85). A rebuild with the KL warm-up
    (``vdvae_kl_warmup=0.5``, not adopted, README) scored 72 of 84, IoU 0.716, PixCorr 0.948."""
    from PIL import Image

    stim, caps, _ = draw_pool(96, 128, seed=991)
    model = miniature.load_vdvae()
    side = model.config.image_size
    small = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR)) for im in stim])
    lat = m.extract_latents(model, stim, posterior="mean", progress=False)
    rec = m.decode_latents(model, lat, pixels="mean", progress=False)  # (96, side, side, 3)
    shape_of = {i: s for i, c in enumerate(caps[:, 0]) for s in SHAPES if f" {s}" in str(c)}
    seen = {i: _centred(_object_mask(small[i])) for i in shape_of}
    hits = 0
    for i in shape_of:
        drawn = _centred(_object_mask(rec[i]))
        nearest = max((j for j in shape_of if j != i), key=lambda j: _iou(seen[j], drawn))
        hits += shape_of[nearest] == shape_of[i]
    overlap = np.mean([_iou(_object_mask(small[i]), _object_mask(rec[i])) for i in shape_of])
    assert len(shape_of) == 84 and hits >= 38, hits
    assert overlap > 0.42 and np.median(_pixcorr(rec, small)) > 0.85


def test_trained_clip_matches_images_to_their_captions(fresh_images):
    """Retrieval among 48 unseen images by their first caption: chance top-1 is 1/48 (2 %);
    measured top-1 75 % (top-5 100 %), threshold 40 %."""
    stim, caps = fresh_images
    clip = miniature.load_clip()
    with torch.no_grad():
        v = clip.vision_model(pixel_values=clip.pixel_values(stim)).image_embeds
        t = clip.text_model(input_ids=clip.tokenize([str(c) for c in caps[:, 0]])).text_embeds
    sim = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    top1 = (sim.argmax(dim=1) == torch.arange(len(stim))).float().mean().item()
    assert top1 > 0.4


# ----------------------------------------------------------------------------- CLIP batches
def test_colour_pair_reads_the_generators_attributes():
    _, caps, attrs = draw_pool(40, 32, seed=5)
    pairs = colour_pair(attrs)
    names = list(COLOURS)
    for cap, pair in zip(caps[:, 0], pairs):
        words = str(cap).split()
        if words[-1] != "background":  # a photo: "a photo of a tabby cat", ...
            assert pair == -1
        else:  # "a {fg} {shape} on a {bg} background"
            assert pair == names.index(words[1]) * len(names) + names.index(words[-2])


def test_clip_batches_hold_colour_pair_groups_without_repeats():
    from miniature.train import _clip_batch

    rng = np.random.default_rng(0)
    pairs = np.repeat(np.arange(10), 8)
    pairs[::9] = -1  # photos are never grouped
    for _ in range(20):
        idx = _clip_batch(pairs, 32, 4, rng)
        assert len(idx) == 32 and len(set(idx.tolist())) == 32
        grouped = pairs[idx[:16]].reshape(4, 4)
        assert (grouped >= 0).all() and (grouped == grouped[:, :1]).all()
        assert len(set(grouped[:, 0].tolist())) == 4  # four different colour pairs
    # too few images per pair for a group of 9: plain uniform batches
    idx = _clip_batch(pairs, 32, 9, rng)
    assert len(set(idx.tolist())) == 32
    assert np.array_equal(_clip_batch(pairs, 16, 1, np.random.default_rng(1)),
                          np.random.default_rng(1).choice(len(pairs), 16, replace=False))


# ----------------------------------------------------------------------------- probes
def test_attribute_labels_match_the_captions():
    from miniature.probe import attribute_labels
    from prepare_data.synthetic import POSITIONS, SHAPES

    _, caps, attrs = draw_pool(40, 32, seed=6)
    labels = attribute_labels(attrs)
    names = list(COLOURS)
    for i, (first, second) in enumerate(zip(caps[:, 0], caps[:, 1])):
        words = str(first).split()
        if words[-1] != "background":  # a photo crop
            continue
        # "a {fg} {shape} on a {bg} background", "a {shape} in {fg} at the {position}"
        assert (labels["fg colour"][i], labels["shape"][i], labels["bg colour"][i]) == (
            names.index(words[1]), SHAPES.index(words[2]), names.index(words[-2]))
        assert labels["position"][i] == list(POSITIONS).index(str(second).split()[-1])


def test_probe_reads_an_encoded_label_and_falls_to_chance_without_it():
    from miniature.probe import probe_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    noise = rng.normal(size=(400, 3, 20))
    coded = noise.copy()
    coded[:, 0, :4] += 3 * np.eye(4)[y]  # the label written into one token's first four dimensions
    assert probe_accuracy(coded, y) > 0.8  # measured 0.90
    assert probe_accuracy(noise, y) < 0.4  # chance 0.25


def test_trained_clip_text_tokens_carry_the_shape_words():
    """The caption-averaged text tokens name the shape (measured 100 % of 4 at this n, chance 25 %)."""
    from miniature.probe import linear_probes

    table = linear_probes(miniature.load_clip(), n=240, features=["text tokens"])
    assert table["chance"]["shape"] == 0.25
    assert table["text tokens"]["shape"] > 0.8


def test_variance_shares_match_a_least_squares_fit_on_class_dummies():
    """The share of variance an attribute explains is the R^2 of regressing the features on its
    class indicators (computed here with lstsq); a label the features do not carry explains ~0."""
    from miniature.probe import variance_shares

    rng = np.random.default_rng(1)
    y, unrelated = rng.integers(0, 4, 500), rng.integers(0, 3, 500)
    x = rng.normal(size=(500, 2, 3))
    x[:, 0, 0] += 2.0 * y  # class means 0, 2, 4, 6 in one of six dimensions
    shares = variance_shares(x, {"planted": y, "unrelated": unrelated})
    flat = x.reshape(500, -1)
    dummies = np.eye(4)[y]
    fit = dummies @ np.linalg.lstsq(dummies, flat, rcond=None)[0]
    r2 = 1 - ((flat - fit) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    assert shares["planted"] == pytest.approx(r2, rel=1e-9)
    assert 0.3 < shares["planted"] < 0.5  # 5 / (5 + 6): between variance 5 of a total 11
    assert shares["unrelated"] < 0.01


def test_swap_attribute_changes_exactly_one_word_of_each_caption():
    from miniature.probe import attribute_labels, swap_attribute
    from prepare_data.synthetic import SHAPES

    _, caps, attrs = draw_pool(48, 32, seed=6)
    labels, names = attribute_labels(attrs), list(COLOURS)
    drawn = attrs[:, -1] == 0
    for attribute in ("shape", "fg colour", "bg colour"):
        swapped = swap_attribute(caps, attrs, attribute)
        for i in np.flatnonzero(drawn):
            for before, after in zip(caps[i], swapped[i]):
                old, new = str(before).split(), str(after).split()
                changed = [k for k in range(len(old)) if old[k] != new[k]]
                if attribute == "shape":
                    assert len(changed) == 1 and old[changed[0]] == SHAPES[labels["shape"][i]]
                    assert new[changed[0]] in SHAPES
                elif attribute == "bg colour":
                    # only "a {shape} in {fg} at the {position}" does not name the background
                    if "background" in old:
                        assert changed == [old.index("background") - 1]
                    else:
                        assert not changed
                else:
                    assert len(changed) == 1 and old[changed[0]] == names[labels["fg colour"][i]]
                if changed:
                    assert new[changed[0]] not in (names[labels["fg colour"][i]], names[labels["bg colour"][i]])
    with pytest.raises(ValueError, match="unknown attribute"):
        swap_attribute(caps, attrs, "size")


def test_trained_unet_reads_the_colour_words():
    """``caption_swap_sensitivity`` on the committed miniature: naming another object colour in the
    caption makes the UNet's clean-latent estimate clearly worse (measured +19 % at t = 500 on the
    committed weights; shape +1 %). The shape word's effect is printed, not asserted: it is the
    miniature's known weakness (README)."""
    from miniature.probe import caption_swap_sensitivity

    sens = caption_swap_sensitivity(miniature.load_clip(), miniature.load_versatile(), n=96, timesteps=(500,))
    print("caption swap sensitivity at t=500", {k: round(v[500], 4) for k, v in sens.items()})
    assert sens["fg colour"][500] > 0.05


# ----------------------------------------------------------------------------- model modes
def test_model_modes_and_deprecated_key(capsys):
    from pipeline.config import load_config
    from pipeline.errors import UserError

    cfg = load_config([], ["run.tiny_models=true"])
    assert cfg.models.mode == "random-tiny" and cfg.run.tiny_models
    assert "run.tiny_models is deprecated" in capsys.readouterr().err
    cfg = load_config([], ["models.mode=trained-miniature"])
    assert cfg.run.tiny_models and not capsys.readouterr().err
    assert not load_config([]).run.tiny_models
    with pytest.raises(UserError, match="models.mode"):
        load_config([], ["models.mode=tiny"])
