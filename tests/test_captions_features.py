"""The common format keeps every caption; the features step encodes the first features.max_captions."""
import json

import numpy as np
import pytest

from models import load as load_models
from pipeline.config import load_config
from pipeline.errors import UserError
from regression.extract_features import _encode_captions, first_captions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPS = np.array([[f"a photo number {j} of a red square" for j in range(7)],
                 ["a blue circle", "", "a blue round disc", "", "", "", ""],
                 ["", "", "", "", "", "", ""]], dtype="<U40")


def test_first_captions_keeps_order_and_skips_empty():
    out = first_captions(CAPS, 5)
    assert out.shape == (3, 5)
    assert list(out[0]) == list(CAPS[0, :5])
    assert list(out[1]) == ["a blue circle", "a blue round disc", "", "", ""]
    assert list(out[2]) == [""] * 5
    assert first_captions(CAPS, 0).shape == (3, 7)  # 0 = all
    assert first_captions(CAPS[1:], 5).shape == (2, 2)  # no wider than needed
    with pytest.raises(UserError, match="max_captions"):
        first_captions(CAPS, -1)


@pytest.mark.parametrize("k", [5, 0])
def test_cliptext_is_the_mean_over_the_first_k_captions(tmp_path, k):
    cfg = load_config([], ["models.mode=random-tiny", f"features.max_captions={k}"])
    clip = load_models.clip(cfg, "cpu")
    path = tmp_path / "cliptext_train.npy"
    _encode_captions(clip, CAPS, path, "test", cfg, progress=False)
    got = np.load(path)
    # by hand: each caption alone (one-caption rows), then the average of the chosen ones
    n = 7 if k == 0 else k
    single = clip.encode_captions_per_image(CAPS[0, :n, None])
    np.testing.assert_allclose(got[0], single.mean(0), rtol=1e-5, atol=1e-6)
    two = clip.encode_captions_per_image(np.array([["a blue circle"], ["a blue round disc"]]))
    np.testing.assert_allclose(got[1], two.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], clip.unconditional_text().numpy(), rtol=1e-5, atol=1e-6)
    if k == 5:  # the 6th and 7th captions are not used
        assert np.abs(got[0] - clip.encode_captions_per_image(CAPS[:1]).squeeze(0)).max() > 1e-4
    record = json.loads(path.with_suffix(".captions.json").read_text())
    assert record["max_captions"] == k and record["captions_available"] == 9
    assert record["captions_encoded"] == (7 if k == 5 else 9)
    assert record["images_with_more_than_encoded"] == (1 if k == 5 else 0)
