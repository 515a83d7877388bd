"""Image data as users keep it: a folder with one subfolder per class, or a list file.

Images are decoded in batches, never all at once, with the preprocessing declared once
(``Preprocess``) and recorded in the compiled model so that ``run`` and ``eval`` apply
the same. Needs Pillow (``pip install pillow``, the ``images`` extra).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    resize: shorter side resized to this many pixels first (0: keep).
    crop: square crop of this size (0: none); ``crop_mode`` center or random (seeded).
    mean, std: per-channel normalisation of pixels scaled to [0, 1] (empty: none).
    channel_order: RGB, BGR or L (grayscale). layout: NCHW or NHWC.
    """

    resize: int = 0
    crop: int = 0
    crop_mode: str = "center"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.crop_mode not in ("center", "random"):
            raise ConfigError(f"crop mode '{self.crop_mode}' is unknown; use center or random (--crop-mode)")
        if self.channel_order not in ("RGB", "BGR", "L"):
            raise ConfigError(f"channel order '{self.channel_order}' is unknown; use RGB, BGR or L (--channel-order)")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"layout '{self.layout}' is unknown; use NCHW or NHWC (--layout)")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"--mean has {len(self.mean)} values but --std has {len(self.std)}; give one per channel")
        if any(s == 0 for s in self.std):
            raise ConfigError("--std values must be non-zero")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the compiled model's metadata)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def apply(self, path: Path, rng: np.random.Generator | None = None) -> np.ndarray:
        """Decode and preprocess one image: float32 [C, H, W] or [H, W, C]."""
        try:
            from PIL import Image
        except ImportError:
            raise ConfigError("reading image folders needs Pillow: pip install pillow (or ann2snn[images])") from None
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channel_order == "L" else "RGB")
                if self.resize:
                    w, h = im.size
                    scale = self.resize / min(w, h)
                    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
                if self.crop:
                    w, h = im.size
                    if w < self.crop or h < self.crop:
                        raise DataError(f"image '{path}' is {w}x{h} after resizing, smaller than the crop {self.crop}; "
                                        "raise --resize")
                    if self.crop_mode == "random" and rng is not None:
                        x0, y0 = int(rng.integers(0, w - self.crop + 1)), int(rng.integers(0, h - self.crop + 1))
                    else:
                        x0, y0 = (w - self.crop) // 2, (h - self.crop) // 2
                    im = im.crop((x0, y0, x0 + self.crop, y0 + self.crop))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise DataError(f"image '{path}' could not be read ({exc}); remove or replace the file") from None
        a = a[:, :, None] if a.ndim == 2 else a
        if self.channel_order == "BGR":
            a = a[:, :, ::-1]
        if self.mean:
            if len(self.mean) != a.shape[2]:
                raise ConfigError(f"--mean has {len(self.mean)} values for {a.shape[2]}-channel images")
            a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(a if self.layout == "NHWC" else a.transpose(2, 0, 1), dtype=np.float32)


def is_image_source(path: str | os.PathLike[str]) -> bool:
    """A folder, or a .txt/.lst list file of image paths."""
    p = Path(path)
    return p.is_dir() or p.suffix in (".txt", ".lst")


class ImageSource:
    """Image files with optional integer labels, decoded batch by batch."""

    def __init__(self, path: str | os.PathLike[str], preprocess: Preprocess) -> None:
        root = Path(path)
        self.pre = preprocess
        if root.is_dir():
            classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            if classes:
                self.files = [f for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                              if f.suffix.lower() in IMAGE_SUFFIXES]
                index = {c: i for i, c in enumerate(classes)}
                self.labels: np.ndarray | None = np.array([index[f.relative_to(root).parts[0]] for f in self.files],
                                                          np.int64)
            else:
                self.files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                self.labels = None
            self.classes = classes
        elif root.is_file():
            files, labels = [], []
            for n, line in enumerate(root.read_text().splitlines(), 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
                    raise DataError(f"list file '{root}', line {n}: expected 'path [integer label]', got '{line}'")
                files.append((root.parent / parts[0]) if not Path(parts[0]).is_absolute() else Path(parts[0]))
                labels.append(int(parts[1]) if len(parts) == 2 else None)
            self.files = files
            self.labels = None if any(lab is None for lab in labels) else np.array(labels, np.int64)
            self.classes = []
        else:
            raise DataError(f"image data '{root}' does not exist; pass a folder (class subfolders) or a list file")
        if not self.files:
            raise DataError(f"image data '{root}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise DataError(f"image data '{root}' lists {len(missing)} missing file(s), e.g. '{missing[0]}'")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, indices: Sequence[int], rng: np.random.Generator | None = None) -> np.ndarray:
        """The preprocessed images at ``indices`` as one float32 batch."""
        return np.stack([self.pre.apply(self.files[i], rng) for i in indices])

    def chunks(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Sequential (images, labels) batches over the whole set."""
        for i in range(0, len(self.files), batch):
            idx = list(range(i, min(i + batch, len(self.files))))
            yield self.load(idx), (self.labels[idx] if self.labels is not None else None)


def preprocess_from_config(config: dict[str, Any]) -> Preprocess:
    """The Preprocess recorded in a compiled model's metadata ``config``."""
    return Preprocess(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                         if k in Preprocess.__dataclass_fields__})
