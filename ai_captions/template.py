"""An offline, deterministic stand-in for a vision-language model (demo and tests).

``TemplateClient`` speaks the part of the chat-completions interface that
:class:`ai_captions.generate.Generator` uses: it decodes the base64 PNG of the request and
describes the image's colours and layout from its pixels, short or long as the prompt asks.
It lets the AI-caption experiment run end to end without a network or an API key.
"""
from __future__ import annotations

import base64
import io as _io
from types import SimpleNamespace

import numpy as np
from PIL import Image

NAMED = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 50),
         "purple": (140, 60, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
         "gray": (128, 128, 128), "brown": (120, 80, 40)}
_NAMES = list(NAMED)
_RGB = np.array(list(NAMED.values()), dtype=float)
REGIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def colour_name(pixels: np.ndarray) -> str:
    """The named colour nearest to the mean of ``pixels`` (…, 3)."""
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return _NAMES[int(np.argmin(((_RGB - mean) ** 2).sum(axis=1)))]


def describe(image: np.ndarray, long: bool, high_level: bool) -> str:
    h, w = image.shape[:2]
    centre = colour_name(image[h // 3: 2 * h // 3, w // 3: 2 * w // 3])
    border = colour_name(np.concatenate([image[: h // 6].reshape(-1, 3), image[-h // 6:].reshape(-1, 3)]))
    text = (f"a {centre} object in front of a {border} background" if high_level
            else f"a {centre} region in the centre surrounded by {border}")
    if long:
        parts = [f"the {name} part is mostly {colour_name(image[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2])}"
                 for name, (r, c) in REGIONS.items()]
        text += "; " + ", ".join(parts) + f", and the middle of the picture is dominated by {centre} tones"
        text += f" while the edges stay {border}, with soft texture across the whole frame"
    return text


class TemplateClient:
    """``client.chat.completions.create(model=..., messages=[...], ...)`` → a template caption."""

    def __init__(self):
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, messages, **_):
        content = messages[0]["content"]
        prompt = next(c["text"] for c in content if c["type"] == "text").lower()
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        image = np.asarray(Image.open(_io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        text = describe(image, long="70 tokens" in prompt, high_level="what is happening" in prompt)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text))])
