"""Train a LeakyReLU YOLO-style detector on composited Fashion-MNIST scenes; export it with both
torch exporters (issue 16).

Network (``YOLO``): Darknet-style, every block Conv-BN-LeakyReLU(0.1) ("CBL"). Backbone: a 3x3
CBL stem with stride 2 (32x32), then three stages, each a strided 3x3 CBL followed by Darknet
residual blocks (``x + CBL3x3(CBL1x1(x))``, the 1x1 halving the channels, no activation after
the add): C2 32 channels at stride 4 (one block), C3 64 at stride 8 (two blocks), C4 80 at
stride 16 (one block). Neck as in YOLOv3 (upsample and *concatenate*, not add): C4 -> 1x1 CBL ->
nearest 2x -> concat C3 -> 1x1 CBL, 3x3 CBL = P3 (stride 8); P3 -> 1x1 CBL -> 2x -> concat C2
-> 1x1 CBL, 3x3 CBL = P2 (stride 4). Two scales, because the scenes' objects are 16-40 px on a
64 px canvas (YOLOv3's strides 8/16/32 are for 416 px images).

Head: anchor-free and decoupled (YOLOX-style, our choice: anchor boxes buy nothing with one
object size range per level and would need their own decoding and matching), shared by both
levels, with the same outputs and targets as ``build_detection.py``'s FCOS head so that the
training loop, the loss (sigmoid focal loss, centerness-weighted GIoU, centerness BCE; the
centerness plays the part of YOLO's objectness), the target assignment and the ONNX
post-processing are imported from there, not copied: a classification and a regression tower
(one 3x3 CBL each), 10 class logits, distances ``l, t, r, b`` (``exp(s_level * x) * stride``)
and centerness.

Export: the raw head outputs, once with the legacy exporter (``det_yolo.onnx``, opset 17) and
once with the dynamo exporter (``det_yolo_dynamo.onnx``, opset 18, one file, no external data);
then ``build_detection.append_postprocess`` appends the decoding and NonMaxSuppression to both,
so the output is the same as ``det_fcos.onnx``'s: ``detections`` float32 ``[K, 7]`` rows
``[image_index, class_id, score, x1, y1, x2, y2]``. The script checks each file's
post-processing against the numpy reference, onnxruntime against torch, and prints the ANN's mAP.

Run: ``/work/torch-venv/bin/python models/build_yolo.py`` (1 thread; writes both files next to
this script; ``--pt FILE`` also saves the weights, ``--pt FILE --from-pt`` exports them again without
training). ``--snn N`` also compiles each file with ann2snn's defaults and prints the SNN's
mAP on the first N test scenes by T.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from build_detection import (RAW_NAMES, _Raw, add_heads, conv_bn, detection_parser, export_onnx, head_outputs,
                             report, train_timed)
from onnx import TensorProto, helper
from torch import nn

SLOPE = 0.1


def cbl(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    """Conv-BN-LeakyReLU(0.1), Darknet's block."""
    return nn.Sequential(conv_bn(cin, cout, stride, k), nn.LeakyReLU(SLOPE))


class DarkResidual(nn.Module):
    """Darknet residual block: ``x + CBL3x3(CBL1x1(x))``, the 1x1 halving the channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = cbl(c, c // 2, k=1), cbl(c // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (no activation after the add, as in Darknet-53)."""
        return x + self.b(self.a(x))


class YOLO(nn.Module):
    """Darknet backbone, YOLOv3 concat neck (P2, P3), shared anchor-free heads; raw (cls, reg, ctr) per level."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = cbl(1, 16, 2)                                                      # 32x32
        self.stage2 = nn.Sequential(cbl(16, 32, 2), DarkResidual(32))                   # 16x16, stride 4 (C2)
        self.stage3 = nn.Sequential(cbl(32, 64, 2), DarkResidual(64), DarkResidual(64))  # 8x8, stride 8 (C3)
        self.stage4 = nn.Sequential(cbl(64, 80, 2), DarkResidual(80))                   # 4x4, stride 16 (C4)
        self.reduce4 = cbl(80, 48, k=1)
        self.neck3 = nn.Sequential(cbl(48 + 64, 64, k=1), cbl(64, width))              # P3
        self.reduce3 = cbl(width, 32, k=1)
        self.neck2 = nn.Sequential(cbl(32 + 32, 32, k=1), cbl(32, width))              # P2
        add_heads(self, width, lambda: nn.LeakyReLU(SLOPE))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[cls_P2, reg_P2, ctr_P2, cls_P3, reg_P3, ctr_P3]; reg is log(distance / stride)."""
        c2 = self.stage2(self.stem(x))
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        p3 = self.neck3(torch.cat([up(self.reduce4(c4)), c3], 1))
        p2 = self.neck2(torch.cat([up(self.reduce3(p3)), c2], 1))
        return head_outputs(self, [p2, p3])


def max_torch_difference(net: nn.Module, path: Path, x: np.ndarray) -> float:
    """Max |torch - onnxruntime| over the raw head outputs of ``path`` on ``x``."""
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in RAW_NAMES)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(RAW_NAMES, {"input": x})
    with torch.no_grad():
        ref = _Raw(net)(torch.from_numpy(x))
    return max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))


def main() -> None:
    """Train, export with both exporters, verify, report the ANN's (and optionally SNN's) mAP."""
    here = Path(__file__).resolve().parent
    p = detection_parser(__doc__.split("\n\n")[0], here / "det_yolo.onnx", Path("/tmp/det_yolo.snn.onnx"), 64000)
    p.add_argument("--out-dynamo", type=Path, default=here / "det_yolo_dynamo.onnx")
    p.add_argument("--pt", type=Path, default=None, help="save the trained weights here (or load them with --from-pt)")
    p.add_argument("--from-pt", action="store_true", help="load --pt instead of training, then export")
    args = p.parse_args()
    if args.from_pt and args.pt is None:
        p.error("--from-pt needs --pt FILE (the weights to load)")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    outs = [(args.out, False), (args.out_dynamo, True)]
    if not args.eval_only:
        torch.manual_seed(args.seed)
        net = YOLO()
        if args.from_pt:
            net.load_state_dict(torch.load(args.pt))
            net.eval()
        else:
            train_timed(net, args)
            if args.pt:
                torch.save(net.state_dict(), args.pt)
        x = dict(np.load(args.test))["input"][:8]
        for path, dynamo in outs:
            export_onnx(net, path, dynamo=dynamo)
            print(f"wrote {path} ({path.stat().st_size:,} bytes); max |torch - onnxruntime| on the raw head outputs "
                  f"{max_torch_difference(net, path, x):.2e}")
    for path, _ in outs:
        report(path, args, args.snn_out.with_name(path.stem + ".snn.onnx"))


if __name__ == "__main__":
    main()
