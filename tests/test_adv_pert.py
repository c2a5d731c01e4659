"""Perturbations of training images against a tiny (randomly initialised, real-architecture) CLIP:
the pixel path, FGSM, the iterative criterion, targets, resumable files and the variant loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adv_pert import perturb as ap
from models.clip import CLIPEmbedder
from pipeline.common_format import SplitData, captions_array, subject_dir, write_split
from pipeline.errors import UserError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CAPTIONS = [["a red square", "a crimson block"], ["a blue circle on the left"], ["green stripes", "", "lines"],
            ["a dog on grass"], ["an orange triangle", "a cone"]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def obj():
    return ap.CLIPObjective(CLIPEmbedder.tiny(seed=0))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)


def _img_embeds(obj, uint8_images):
    """Independent CLIP image embedding of stored uint8 CLIP inputs (n, S, S, 3)."""
    x = (uint8_images.astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    with torch.no_grad():
        e = obj.embedder.vision_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).image_embeds
    return torch.nn.functional.normalize(e, dim=-1)


def _txt_embeds(obj, captions):
    with torch.no_grad():
        e = obj.embedder.text_model(input_ids=obj.embedder.tokenize(list(captions))).text_embeds
    return torch.nn.functional.normalize(e, dim=-1)


def test_clip_input_is_the_pipeline_pixel_path(obj, images):
    x = obj.clip_input(images)
    assert x.shape == (5, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    expected = obj.embedder.pixel_values(images)  # what the features step feeds CLIP
    torch.testing.assert_close((x - obj.mean) / obj.std, expected, atol=1e-5, rtol=0)


def test_targets_friendly_own_captions_adversarial_other_images():
    caps = captions_array(CAPTIONS)
    fr = ap.choose_targets(caps, "friendly", 3)
    assert fr[0].tolist() == ["a red square", "a crimson block", "a red square"]
    assert fr[2].tolist() == ["green stripes", "lines", "green stripes"]
    adv = ap.choose_targets(caps, "adversarial", 4, seed=7)
    owner = {c: i for i, row in enumerate(CAPTIONS) for c in row if c}
    assert all(owner[t] != i for i, row in enumerate(adv) for t in row)
    assert (ap.choose_targets(caps, "adversarial", 4, seed=7) == adv).all()
    assert (ap.choose_targets(caps, "adversarial", 4, seed=8) != adv).any()
    lonely = ap.choose_targets(captions_array([["x"], [""]]), "friendly", 2)
    assert lonely[1].tolist() == ["", ""]  # no caption: no target (left unperturbed)
    with pytest.raises(UserError, match="mode"):
        ap.choose_targets(caps, "hostile", 1)


def test_fgsm_lowers_the_distance_to_the_target_within_eps(obj, images):
    caps = captions_array(CAPTIONS)
    for mode in ("friendly", "adversarial"):
        targets = ap.choose_targets(caps, mode, 2, seed=1)
        base, base_stats = ap.perturb_images(obj, images, targets, "fgsm", eps=0.0)
        out, stats = ap.perturb_images(obj, images, targets, "fgsm", eps=0.03, batch_size=4)
        assert out.shape == base.shape == (5, 2, 32, 32, 3) and out.dtype == np.uint8
        x0 = np.round(obj.clip_input(images).permute(0, 2, 3, 1).numpy() * 255)
        assert (base == x0[:, None].astype(np.uint8)).all()  # ε = 0: the unperturbed CLIP input
        diff = np.abs(out.astype(int) - base.astype(int))
        assert diff.max() <= np.ceil(0.03 * 255) and diff.max() > 0  # L∞ ≤ ε (after uint8 rounding)
        flat_t = _txt_embeds(obj, targets.reshape(-1))
        before = 1 - (_img_embeds(obj, base.reshape(-1, 32, 32, 3)) * flat_t).sum(-1)
        after = 1 - (_img_embeds(obj, out.reshape(-1, 32, 32, 3)) * flat_t).sum(-1)
        assert (after < before).all(), (before, after)
        np.testing.assert_allclose(stats[..., 0].reshape(-1), before.numpy(), atol=1e-5)
        np.testing.assert_allclose(stats[..., 1].reshape(-1), after.numpy(), atol=1e-5)
        assert (stats[..., 2] == 1).all() and (base_stats[..., 2] == 0).all()


def test_learning_rate_schedule():
    assert [ap.learning_rate(s) for s in (0, 49, 50, 99, 100, 299, 300, 499)] == [3, 3, 2, 2, 1.5, 1.5, 1, 1]


def _ratio(obj, x, x0, t):
    with torch.no_grad():
        e, e0 = obj.image_embeds(x), obj.image_embeds(x0)
    return (ap.cosine_distance(e, e0) / ap.cosine_distance(e, t)).item()


def test_iterative_stops_at_the_first_step_meeting_the_criterion(obj, images):
    x0 = obj.clip_input(images[:1])
    t = obj.text_embeds(["a blue circle on the left"])
    fast = ((0, 40.0), (5, 20.0))
    x, steps, reached = ap.iterative(obj, x0, t, "90-10", max_steps=60, schedule=fast)
    n = int(steps[0])
    assert reached[0] == 1 and n >= 1
    assert _ratio(obj, x, x0, t) > 10 / 90
    x_prev, steps_prev, reached_prev = ap.iterative(obj, x0, t, "90-10", max_steps=n - 1, schedule=fast)
    assert reached_prev[0] == 0 and int(steps_prev[0]) == n - 1
    assert _ratio(obj, x_prev, x0, t) <= 10 / 90
    assert 0 <= x.min() and x.max() <= 1
    # a stricter criterion needs more steps; the cap ends it unmet
    x3, steps3, reached3 = ap.iterative(obj, x0, t, "50-50", max_steps=n, schedule=fast)
    assert int(steps3[0]) == n and reached3[0] == 0
    with pytest.raises(UserError, match="criterion"):
        ap.iterative(obj, x0, t, "80/20")


class InterruptAt(ap.CLIPObjective):
    """Raises KeyboardInterrupt on the k-th chunk (an interrupted run); counts chunks otherwise."""

    def __init__(self, embedder, k=None):
        super().__init__(embedder)
        self.k, self.calls = k, 0

    def clip_input(self, images):
        self.calls += 1
        if self.k is not None and self.calls >= self.k:
            raise KeyboardInterrupt
        return super().clip_input(images)


def test_perturb_dataset_resumes_and_load_perturbed_reorders(obj, images, tmp_path):
    ids = np.array(["i0", "i1", "i2", "i3", "i4"])
    caps = captions_array(CAPTIONS)
    kw = dict(mode="adversarial", method="fgsm", eps=0.05, copies=2, seed=3, chunk_size=2, progress=False)
    out = tmp_path / "adv" / "set"
    with pytest.raises(KeyboardInterrupt):
        ap.perturb_dataset(InterruptAt(obj.embedder, k=2), images, ids, caps, out, **kw)
    assert sorted(p.name for p in (tmp_path / "adv" / "set.parts").iterdir()) == [
        "chunk_0000000.npy", "chunk_0000000_stats.npy", "params.json"]
    assert not (tmp_path / "adv" / "set.npy").exists()
    resumed = InterruptAt(obj.embedder)
    path = ap.perturb_dataset(resumed, images, ids, caps, out, **kw)
    assert resumed.calls == 2  # chunks 2-3 and 4 only
    straight = ap.perturb_dataset(obj, images, ids, caps, tmp_path / "straight.npy", **kw)
    arr = np.load(path, allow_pickle=False)
    assert arr.shape == (5, 2, 32, 32, 3) and np.array_equal(arr, np.load(straight, allow_pickle=False))
    assert not (tmp_path / "adv" / "set.parts").exists()
    info = __import__("json").loads((tmp_path / "adv" / "set.json").read_text())
    assert info["params"]["eps"] == 0.05 and info["params"]["mode"] == "adversarial"
    assert info["summary"]["mean_dist_after"] < info["summary"]["mean_dist_before"]
    assert np.load(tmp_path / "adv" / "set_stats.npy").shape == (5, 2, 4)
    # a finished set is not recomputed; other parameters on the same path are refused
    again = InterruptAt(obj.embedder)
    ap.perturb_dataset(again, images, ids, caps, out, **kw)
    assert again.calls == 0
    with pytest.raises(UserError, match="other parameters"):
        ap.perturb_dataset(obj, images, ids, caps, out, **{**kw, "eps": 0.1})

    order = np.array(["i3", "i0", "i4"])
    got = ap.load_perturbed(path, order, 1)
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    assert np.array_equal(got, arr[[3, 0, 4], 1])
    assert np.array_equal(ap.load_perturbed(tmp_path / "adv" / "set", order, 0), arr[[3, 0, 4], 0])
    with pytest.raises(UserError, match=r"set\.npy.*'i9'"):
        ap.load_perturbed(path, np.array(["i0", "i9"]), 0)
    with pytest.raises(UserError, match="copy 2"):
        ap.load_perturbed(path, order, 2)
    with pytest.raises(UserError, match="nothere.npy: file not found"):
        ap.load_perturbed(tmp_path / "nothere.npy", order, 0)


def test_cli_and_variant_builder(images, tmp_path):
    from experiments import builders as ex
    from pipeline.config import load_config
    from pipeline.layout import Layout

    data_dir = tmp_path / "data"
    ids = np.array([11, 12, 13])
    write_split(subject_dir(data_dir, "synthetic", "1"), "train", "1",
                SplitData(stim=images[:3], ids=ids, cap=captions_array(CAPTIONS[:3])))
    out = tmp_path / "pert" / "friendly"
    argv = ["--data-dir", str(data_dir), "--dataset", "synthetic", "--subject", "1", "--mode", "friendly",
            "--method", "fgsm", "--eps", "0.03", "--copies", "2", "--out", str(out), "--tiny", "--device", "cpu",
            "--no-progress"]
    assert ap.main(argv) == 0
    assert ap.main(argv[:-1] + ["--eps", "2"]) == 2  # bad ε: one-line error, exit code 2
    cfg = load_config([], [f"paths.data_dir={data_dir}", f"paths.results_dir={tmp_path / 'res'}",
                           "run.dataset=synthetic"])
    built = ex.BUILDERS["perturbed"](Layout(cfg, "1", "v"), cfg, file=str(out) + ".npy", copy=1)
    stim = built["stim_clipvision"]
    assert stim.shape == (3, 32, 32, 3) and stim.dtype == np.uint8
    assert np.array_equal(stim, np.load(str(out) + ".npy", allow_pickle=False)[:, 1])


def test_adv_pert_experiment_file():
    from experiments.grid import load_experiment

    exp = load_experiment("adv_pert_deeprecon")
    pert = [dict(v.params) for v in exp.variants if v.method == "perturbed"]
    names = {p["file"].split("/")[-1] for p in pert}
    assert {"friendly_fgsm_0.03.npy", "adversarial_fgsm_0.03.npy", "friendly_iterative_80-20.npy",
            "adversarial_iterative_80-20.npy"} <= names
    assert sorted({p["copy"] for p in pert}) == [0, 1, 2, 3, 4]
