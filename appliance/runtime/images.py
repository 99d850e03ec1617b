"""Images for vision models, with pillow and numpy only: base64 in, model-ready pixels out.

Decoding refuses, with a 422 that says why, anything that is not a complete JPEG, PNG or WebP
within the size caps (bad base64, another format, a truncated file, a decompression bomb).
Preprocessing repeats the checkpoint's image processor (transformers' CLIPImageProcessor /
ViTImageProcessor) step by step, as the exporter wrote it into manifest.config: RGB, resize
with the configured filter, center crop, rescale, normalise; the exporter validates the result
against the processor itself.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from appliance.errors import BatchNotSupported, ValidationFailed

FORMATS = ("JPEG", "PNG", "WEBP")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Decoded file size cap (real-time bodies are capped lower by server.max_body_bytes; batch
job lines are not)."""
MAX_IMAGE_PIXELS = 40_000_000
"""Width x height cap, checked from the header before any pixel is decoded: a small file can
claim a huge canvas (a decompression bomb); 40 MP holds any camera photo."""

REDUCING_GAP = 3
"""A large image is decoded or reduced (by whole factors, averaging) only down to this many
times the size the model's resize needs, the last step being the processor's own filter:
pillow's reducing_gap, at which the result is indistinguishable from a full-size resize."""
PIXELS_PER_TOKEN = 64 * 64
"""An image is charged one token per 64x64 patch of the picture as sent (at least the model's
visual tokens): decoding is what a large image costs, whatever size the model sees."""
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "RGBa", "La", "YCbCr"}

_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_URLSAFE = str.maketrans("-_", "+/")

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def require_image(payload: Any, field: str = "image") -> str:
    """The base64 text of `payload[field]`, without a data-URL prefix or whitespace.

    Only the shape and the size are checked here (this runs on the event loop); decoding
    happens in `decode_image`, off it."""
    if not isinstance(payload, dict):
        raise ValidationFailed("`input` must be an object.", details={"field": "input"})
    value = payload.get(field)
    if value is None:
        raise ValidationFailed(f"`{field}` is required.", details={"field": field})
    if isinstance(value, list):
        raise BatchNotSupported(details={"field": field})
    if not isinstance(value, str):
        raise ValidationFailed(
            f"`{field}` must be a base64-encoded JPEG, PNG or WebP image.", details={"field": field}
        )
    text = _DATA_URL.sub("", value.strip(), count=1)
    if text.startswith("data:"):
        raise ValidationFailed(
            f"`{field}`: a data URL must look like data:image/png;base64,...",
            details={"field": field},
        )
    text = "".join(text.split())  # base64 wrapped over lines (MIME style) is still base64
    if not text:
        raise ValidationFailed(f"`{field}` must not be empty.", details={"field": field})
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ValidationFailed(
            f"`{field}` is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.",
            details={"field": field, "max_bytes": MAX_IMAGE_BYTES},
        )
    return text


def _too_many_pixels(field: str, max_pixels: int, size: str = "") -> ValidationFailed:
    what = f"is {size} pixels" if size else "has too many pixels"
    return ValidationFailed(
        f"`{field}` {what}; at most {max_pixels} pixels are accepted.",
        details={"field": field, "max_pixels": max_pixels},
    )


def image_tokens(width: int, height: int, visual_tokens: int) -> int:
    """Tokens charged for a width x height image (see PIXELS_PER_TOKEN)."""
    return max(visual_tokens, -(-width * height // PIXELS_PER_TOKEN))


def _reduction(size: tuple[int, int], min_side: int) -> int:
    """The whole factor an image of `size` may shrink by and keep its short side at least
    REDUCING_GAP x min_side (1: keep it as is)."""
    return max(1, min(size) // (REDUCING_GAP * min_side))


def _converted(image: Image.Image, factor: int) -> Image.Image:
    """`image` converted as the preprocessing would (1-bit to 8-bit gray, the same picture in
    a quarter of RGB's memory; others to RGB) and reduced by `factor`, a band of rows at a
    time: palette indices and bits cannot be averaged, and converting a 40 MP palette image
    whole would cost 160 MB. Bands are whole multiples of `factor`, so the result is the
    same as one reduce of the whole converted image."""
    mode = "L" if image.mode == "1" else "RGB"
    width, height = image.size
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    band = factor * max(1, 256 // factor)
    for top in range(0, height, band):
        rows = image.crop((0, top, width, min(height, top + band))).convert(mode)
        out.paste(rows.reduce(factor), (0, top // factor))
    return out


def decode_image(
    text: str,
    *,
    field: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Base64 text (as `require_image` returns it) to a fully decoded, upright pillow image."""
    return decode_sized(
        text, field=field, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )[0]


def decode_sized(
    text: str,
    *,
    field: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and the (width, height) it was sent at.

    With `min_side` (the short side the model's preprocessing needs), a large image is decoded
    smaller: a JPEG straight from its DCT at 1/2, 1/4 or 1/8 scale (`draft`), other formats
    reduced right after decoding, before any conversion or copy; a 40 MP picture then costs
    one decode buffer, not several."""
    details: dict[str, Any] = {"field": field}
    if "-" in text or "_" in text:
        text = text.translate(_URLSAFE)
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed(f"`{field}` is not valid base64.", details=details) from None
    if not data:
        raise ValidationFailed(f"`{field}` must not be empty.", details=details)
    if len(data) > max_bytes:
        raise ValidationFailed(
            f"`{field}` is {len(data)} bytes; at most {max_bytes}.",
            details={**details, "max_bytes": max_bytes},
        )
    with warnings.catch_warnings():
        # pillow only warns between its own cap and twice that; here any bomb is an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise _too_many_pixels(field, max_pixels) from None
        except Image.UnidentifiedImageError:
            raise ValidationFailed(
                f"`{field}` is not a JPEG, PNG or WebP image.", details=details
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error):
            raise ValidationFailed(
                f"`{field}` could not be decoded: the image data is truncated or corrupt.",
                details=details,
            ) from None
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(field, max_pixels, f"{width}x{height}")
        factor = _reduction(image.size, min_side) if min_side else 1
        if factor > 1 and image.format == "JPEG":
            image.draft(None, (-(-width // factor), -(-height // factor)))
        try:
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise _too_many_pixels(field, max_pixels) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error):
            raise ValidationFailed(
                f"`{field}` could not be decoded: the {image.format or 'image'} data is "
                "truncated or corrupt.",
                details=details,
            ) from None
    if min_side and (factor := _reduction(image.size, min_side)) > 1:
        # The decoded original is dropped here: only the reduced copy lives on.
        image = image.reduce(factor) if image.mode in _REDUCIBLE else _converted(image, factor)
    # Phones store photos sideways plus an EXIF turn; transformers' load_image applies it too,
    # so the model sees the picture as the user does. In place: no copy of the pixels. A broken
    # orientation tag is only metadata: the pixels are still good.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image, (width, height)


def _size(value: Any, what: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"image preprocessing: {what} must be an object, got {value!r}")
    keys = set(value)
    if keys not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(
            f"image preprocessing: {what} {value!r} is not supported "
            "(use {shortest_edge} or {height, width})"
        )
    if not all(isinstance(v, int) and v > 0 for v in value.values()):
        raise ValueError(f"image preprocessing: {what} {value!r} needs positive integers")
    return dict(value)


def _triple(value: Any, what: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"image preprocessing: {what} must be 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class ImagePreprocessor:
    """One checkpoint's image processor, as plain settings (manifest.config["preprocessing"]):

    {"resize": {"shortest_edge": n} | {"height": h, "width": w} | null, "resample": "bicubic",
     "center_crop": {"height": h, "width": w} | null, "rescale_factor": 1/255 | null,
     "image_mean": [r, g, b] | null, "image_std": [r, g, b] | null}
    """

    resize: dict[str, int] | None
    resample: Image.Resampling
    center_crop: dict[str, int] | None
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImagePreprocessor:
        """Raises ValueError (the registry then reports the model as failed) on bad settings."""
        resample = str(config.get("resample", "bicubic")).lower()
        if resample not in RESAMPLE:
            raise ValueError(f"image preprocessing: unknown resample filter {resample!r}")
        pre = cls(
            resize=_size(config.get("resize"), "resize"),
            resample=RESAMPLE[resample],
            center_crop=_size(config.get("center_crop"), "center_crop"),
            rescale_factor=config.get("rescale_factor"),
            image_mean=_triple(config.get("image_mean"), "image_mean"),
            image_std=_triple(config.get("image_std"), "image_std"),
        )
        if pre.center_crop is not None and "shortest_edge" in pre.center_crop:
            raise ValueError("image preprocessing: center_crop needs height and width")
        if (pre.image_mean is None) != (pre.image_std is None):
            raise ValueError("image preprocessing: image_mean and image_std go together")
        _ = pre.output_size  # raises when the images would not all have one size
        return pre

    @property
    def min_side(self) -> int | None:
        """The short side an image needs for this preprocessing to see all it would see at
        full size (None: keep every pixel, as without a resize the crop takes them as they
        are)."""
        if self.resize is None:
            return None
        if "shortest_edge" in self.resize:
            return self.resize["shortest_edge"]
        return max(self.resize["height"], self.resize["width"])

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image: batches need one size."""
        if self.center_crop is not None:
            return self.center_crop["height"], self.center_crop["width"]
        if self.resize is not None and "height" in self.resize:
            return self.resize["height"], self.resize["width"]
        raise ValueError(
            "image preprocessing gives images of varying size: it needs a center_crop or a "
            "resize to height and width"
        )

    def _resized(self, image: Image.Image) -> Image.Image:
        if self.resize is None:
            return image
        if "shortest_edge" in self.resize:
            # transformers' get_resize_output_image_size(default_to_square=False): the short
            # side becomes the size, the long side keeps the ratio, truncated to an int.
            size, (width, height) = self.resize["shortest_edge"], image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if width <= height else (new_long, size)
        else:
            new_h, new_w = self.resize["height"], self.resize["width"]
        if (new_w, new_h) == image.size:
            return image
        return image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)

    def _cropped(self, pixels: np.ndarray) -> np.ndarray:
        """transformers' center_crop on (H, W, C), zero padding an image smaller than the crop."""
        if self.center_crop is None:
            return pixels
        crop_h, crop_w = self.center_crop["height"], self.center_crop["width"]
        height, width = pixels.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        if top >= 0 and left >= 0:
            return pixels[top : top + crop_h, left : left + crop_w]
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
        pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
        padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
        top, left = top + pad_top, left + pad_left
        return padded[max(0, top) : top + crop_h, max(0, left) : left + crop_w]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded image to float32 pixels (3, H, W), channels first, as the model takes."""
        # Always RGB: the models take three channels, and CLIP's processor converts the same
        # way (a grayscale, palette or RGBA image would otherwise not fit).
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(self._resized(image))
        pixels = self._cropped(pixels)
        out = pixels.astype(np.float32)
        if self.rescale_factor is not None:
            # transformers rescales in float64, then casts; the same keeps the same rounding.
            out = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.image_mean is not None and self.image_std is not None:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            out = (out - mean) / std
        if out.shape[:2] != self.output_size:
            raise ValueError(f"preprocessed image is {out.shape[:2]}, expected {self.output_size}")
        return np.ascontiguousarray(out.transpose(2, 0, 1))
