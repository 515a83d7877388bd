"""Train the FCOS-style detector on composited Fashion-MNIST scenes and export it to ONNX.

Data: ``models/scenes.py`` (``make_scenes(n, seed, split)``: 64x64 canvases with several
Fashion-MNIST items, boxes ``x1, y1, x2, y2`` in pixels and their classes). Training
scenes are drawn on the fly from the ``train`` split with fresh seeds; the ANN's mAP is
measured on ``data/scenes_test.npz``.

Network (``FCOS``, 316,481 parameters): a small ResNet-style backbone (3x3 Conv-BN-ReLU
stem with stride 2 and a 2x2 max pool; basic blocks with residual adds and strided 1x1
Conv-BN shortcuts: C2 32 channels at stride 4, C3 64 at stride 8, C4 96 at stride 16), a
feature pyramid (lateral 1x1 convs, nearest 2x upsampling and adds from C4 down to C2; 3x3
output convs give P2 at stride 4 and P3 at stride 8), and heads shared by both levels: a
classification tower and a regression tower (one 3x3 Conv-BN-ReLU each), 10 class logits
(sigmoid focal loss), 4 box distances ``l, t, r, b`` (``exp(scale_level * x) * stride``,
GIoU loss) and centerness (BCE) on the regression tower. Targets are assigned FCOS-style
(centre sampling with a radius of 1.5 strides; objects whose largest location-to-edge
distance is at most 16 px go to P2, the others to P3; the smallest box wins).

Export: torch's legacy exporter writes the network with its raw head outputs per level;
the post-processing is then appended with ``onnx.helper`` (no custom torch symbolic):
flatten and concatenate the levels, ``score = sqrt(sigmoid(cls) * sigmoid(ctr))``,
decoding of the distances around each location into ``x1, y1, x2, y2`` (clipped to the
image), ``NonMaxSuppression`` per class (at most 10 boxes per class and image, IoU 0.5,
score > 0.05), and the gathers that assemble the one output ``detections``: float32
``[K, 7]`` rows ``[image_index, class_id, score, x1, y1, x2, y2]`` in input pixels, the
images of a batch concatenated. Input ``input``: float32 ``[N, 1, 64, 64]`` in [0, 1],
dynamic batch. The script checks the ONNX post-processing against a numpy reference.

Run: ``/tmp/torchenv/bin/python models/build_detection.py`` (writes ``det_fcos.onnx``
next to this script and prints the ANN's mAP@0.5 and mAP@[.5:.95] on the test scenes).
``--snn N`` also compiles the model with ann2snn and prints the SNN's mAP on the first N
test scenes by T.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

OPSET = 17
NUM_CLASSES = 10
IMAGE = 64
STRIDES = (4, 8)
#: objects whose largest location-to-edge distance is below this go to P2, the rest to P3
LEVEL_SPLIT = 16.0
CENTER_RADIUS = 1.5
MAX_PER_CLASS = 10
IOU_THRESHOLD = 0.5
SCORE_THRESHOLD = 0.05
PRIOR = 0.01


# ---------------------------------------------------------------------------- network
def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    """Conv (no bias) + BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


def add_heads(net: nn.Module, width: int, act: Callable[[], nn.Module]) -> None:
    """Give ``net`` the heads shared by the levels: a classification and a regression tower (one
    3x3 Conv-BN-``act`` each), class logits, ``l, t, r, b`` distances with a learnt scale per level,
    and centerness; class bias at the focal-loss prior."""
    net.cls_tower = nn.Sequential(conv_bn(width, width), act())
    net.reg_tower = nn.Sequential(conv_bn(width, width), act())
    net.cls = nn.Conv2d(width, NUM_CLASSES, 3, 1, 1)
    net.reg = nn.Conv2d(width, 4, 3, 1, 1)
    net.ctr = nn.Conv2d(width, 1, 3, 1, 1)
    net.scales = nn.Parameter(torch.ones(len(STRIDES)))
    nn.init.normal_(net.cls.weight, std=0.01)
    nn.init.constant_(net.cls.bias, -math.log((1 - PRIOR) / PRIOR))
    for m in (net.reg, net.ctr):
        nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(m.bias)


def head_outputs(net: nn.Module, levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """The heads of ``add_heads`` on each level's features: [cls, reg, ctr] per level, in STRIDES order."""
    outs = []
    for i, p in enumerate(levels):
        ct, rt = net.cls_tower(p), net.reg_tower(p)
        outs += [net.cls(ct), net.reg(rt) * net.scales[i], net.ctr(rt)]
    return outs


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, stride), conv_bn(cout, cout)
        self.short = conv_bn(cin, cout, stride, k=1) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(b(relu(a(x))) + shortcut(x))."""
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class FCOS(nn.Module):
    """Backbone, FPN (C2..C4 -> P2, P3) and shared heads; returns raw (cls, reg, ctr) per level."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16, 2), nn.ReLU(), nn.MaxPool2d(2))  # 16x16, stride 4
        self.layer2 = BasicBlock(16, 32, 1)                                 # 16x16, stride 4 (C2)
        self.layer3 = BasicBlock(32, 64, 2)                                 # 8x8, stride 8 (C3)
        self.layer4 = BasicBlock(64, 96, 2)                                 # 4x4, stride 16 (C4)
        self.lat2, self.lat3, self.lat4 = nn.Conv2d(32, width, 1), nn.Conv2d(64, width, 1), nn.Conv2d(96, width, 1)
        self.out2, self.out3 = nn.Conv2d(width, width, 3, 1, 1), nn.Conv2d(width, width, 3, 1, 1)
        add_heads(self, width, nn.ReLU)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[cls_P2, reg_P2, ctr_P2, cls_P3, reg_P3, ctr_P3]; reg is log(distance / stride)."""
        c2 = self.layer2(self.stem(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")
        t3 = self.lat3(c3) + up(self.lat4(c4))
        t2 = self.lat2(c2) + up(t3)
        return head_outputs(self, [self.out2(t2), self.out3(t3)])


# -------------------------------------------------------------------- locations, targets
def locations() -> tuple[np.ndarray, np.ndarray]:
    """Location centres [P, 2] (x, y in pixels) and their strides [P], P3 then P4, row-major."""
    pts, strides = [], []
    for s in STRIDES:
        n = IMAGE // s
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        pts.append(np.stack([xs.ravel() * s + s // 2, ys.ravel() * s + s // 2], 1))
        strides.append(np.full(n * n, s))
    return np.concatenate(pts).astype(np.float32), np.concatenate(strides).astype(np.float32)


def flatten_levels(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head outputs per level -> cls [N,10,P], reg [N,4,P], ctr [N,1,P] (same order as ONNX)."""
    cat = [torch.cat([o.flatten(2) for o in outs[k::3]], 2) for k in range(3)]
    return cat[0], cat[1], cat[2]


def assign_targets(boxes: list[np.ndarray], labels: list[np.ndarray], loc: torch.Tensor, stride: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FCOS targets for a batch: class [B,P] (-1 = background), ltrb [B,P,4], centerness [B,P]."""
    B, P = len(boxes), len(loc)
    M = max(1, max(len(b) for b in boxes))
    gt = torch.zeros(B, M, 4)
    lab = torch.full((B, M), -1, dtype=torch.long)
    for i, (b, lb) in enumerate(zip(boxes, labels)):
        gt[i, : len(b)] = torch.from_numpy(b)
        lab[i, : len(b)] = torch.from_numpy(lb)
    x, y = loc[None, :, None, 0], loc[None, :, None, 1]                       # [1,P,1]
    x1, y1, x2, y2 = (gt[:, None, :, k] for k in range(4))                      # [B,1,M]
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], -1)                   # [B,P,M,4]
    rad = CENTER_RADIUS * stride[None, :, None]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    in_center = ((x > torch.maximum(cx - rad, x1)) & (x < torch.minimum(cx + rad, x2))
                 & (y > torch.maximum(cy - rad, y1)) & (y < torch.minimum(cy + rad, y2)))
    maxd = ltrb.max(-1).values
    lo = torch.where(stride == STRIDES[0], 0.0, LEVEL_SPLIT)[None, :, None]
    hi = torch.where(stride == STRIDES[0], LEVEL_SPLIT, float("inf"))[None, :, None]
    ok = in_center & (ltrb.min(-1).values > 0) & (maxd >= lo) & (maxd <= hi) & (lab[:, None, :] >= 0)
    area = ((x2 - x1) * (y2 - y1)).expand(B, P, M)
    area = torch.where(ok, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(-1)
    pos = torch.isfinite(best_area)
    cls_t = torch.where(pos, lab.gather(1, best), torch.full_like(best, -1))
    reg_t = ltrb.gather(2, best[..., None, None].expand(B, P, 1, 4)).squeeze(2)
    lr, tb = reg_t[..., [0, 2]], reg_t[..., [1, 3]]
    ctr_t = torch.sqrt((lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)).clamp(min=0)
                       * (tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)).clamp(min=0))
    return cls_t, reg_t, torch.where(pos, ctr_t, torch.zeros_like(ctr_t))


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU loss of ltrb distances around the same location (per row)."""
    pa = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    ta = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    wi = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    hi = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = wi * hi
    union = pa + ta - inter
    wc = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    hc = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = wc * hc + 1e-7
    iou = inter / union.clamp(min=1e-7)
    return 1 - (iou - (enclose - union) / enclose)


def detection_loss(outs: list[torch.Tensor], boxes: list[np.ndarray], labels: list[np.ndarray],
                   loc: torch.Tensor, stride: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal loss (classes) + centerness-weighted GIoU (boxes) + BCE (centerness)."""
    cls, reg, ctr = flatten_levels(outs)
    cls, reg, ctr = cls.transpose(1, 2), reg.transpose(1, 2), ctr[:, 0]                # [B,P,10], [B,P,4], [B,P]
    cls_t, reg_t, ctr_t = assign_targets(boxes, labels, loc, stride)
    pos = cls_t >= 0
    npos = max(float(pos.sum()), 1.0)
    onehot = torch.zeros_like(cls)
    onehot[pos] = F.one_hot(cls_t[pos], NUM_CLASSES).float()
    p = torch.sigmoid(cls)
    ce = F.binary_cross_entropy_with_logits(cls, onehot, reduction="none")
    pt = p * onehot + (1 - p) * (1 - onehot)
    alpha = 0.25 * onehot + 0.75 * (1 - onehot)
    l_cls = (alpha * (1 - pt) ** 2 * ce).sum() / npos
    if pos.any():
        dist = torch.exp(reg[pos].clamp(max=10)) * stride[None, :, None].expand_as(reg)[pos]
        w = ctr_t[pos]
        l_box = (giou_loss(dist, reg_t[pos]) * w).sum() / w.sum().clamp(min=1e-6)
        l_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t[pos], reduction="sum") / npos
    else:
        l_box = l_ctr = reg.sum() * 0
    return l_cls + l_box + l_ctr, {"cls": l_cls.item(), "box": l_box.item(), "ctr": l_ctr.item()}


def split_boxes(scenes: dict[str, np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-image lists of boxes [M,4] and labels [M] from the flat scene arrays."""
    img = scenes["box_image"]
    return ([scenes["boxes"][img == i].astype(np.float32) for i in range(n)],
            [scenes["box_labels"][img == i].astype(np.int64) for i in range(n)])


def flip_scenes(x: torch.Tensor, boxes: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Horizontally mirrored scenes and boxes."""
    return x.flip(3), [np.stack([IMAGE - b[:, 2], b[:, 1], IMAGE - b[:, 0], b[:, 3]], 1) for b in boxes]


def train(net: nn.Module, scenes_total: int, batch: int, chunk: int, lr: float, seed: int) -> None:
    """AdamW with warm-up and cosine decay on training scenes: chunks of fresh scenes (seeds
    seed, seed+1, ...), each used twice, as drawn and mirrored."""
    from scenes import make_scenes

    loc_np, stride_np = locations()
    loc, stride = torch.from_numpy(loc_np), torch.from_numpy(stride_np)
    steps = scenes_total // batch
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    net.train()
    step, t_start, chunk_idx = 0, time.perf_counter(), 0
    log_every = max(1, steps // 40)
    running: dict[str, float] = {}
    seen = 0
    while step < steps:
        sc = make_scenes(chunk, seed=seed + chunk_idx, split="train")
        chunk_idx += 1
        x0 = torch.from_numpy(sc["input"])
        bx0, lb = split_boxes(sc, len(x0))
        for x, bx in ((x0, bx0), flip_scenes(x0, bx0)):
            for i in range(0, len(x) - batch + 1, batch):
                if step >= steps:
                    break
                loss, parts = detection_loss(net(x[i:i + batch]), bx[i:i + batch], lb[i:i + batch], loc, stride)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 10.0)
                opt.step()
                sched.step()
                step += 1
                seen += 1
                for k, v in parts.items():
                    running[k] = running.get(k, 0.0) + v
                if step % log_every == 0 or step == steps:
                    msg = " ".join(f"{k} {v / seen:.3f}" for k, v in running.items())
                    print(f"  step {step}/{steps} ({step * batch} scenes): {msg} "
                          f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
                    running, seen = {}, 0
    net.eval()


# ------------------------------------------------------------------------------ export
class _Raw(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(x))


RAW_NAMES = [f"{k}_s{s}" for s in STRIDES for k in ("cls", "reg", "ctr")]


def _const(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def append_postprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append decoding and per-class NMS to a graph whose outputs are the raw head outputs."""
    g = model.graph
    loc, stride = locations()
    P = len(loc)
    inits = [
        _const("pp/shape_cls", np.array([0, NUM_CLASSES, -1], np.int64)),
        _const("pp/shape_reg", np.array([0, 4, -1], np.int64)),
        _const("pp/shape_ctr", np.array([0, 1, -1], np.int64)),
        _const("pp/strides", stride.reshape(1, 1, P)),
        _const("pp/centres", np.stack([loc[:, 0], loc[:, 1], loc[:, 0], loc[:, 1]])[None].astype(np.float32)),
        _const("pp/signs", np.array([-1, -1, 1, 1], np.float32).reshape(1, 4, 1)),
        _const("pp/zero", np.array(0.0, np.float32)),
        _const("pp/size", np.array(float(IMAGE), np.float32)),
        _const("pp/max_per_class", np.array([MAX_PER_CLASS], np.int64)),
        _const("pp/iou", np.array([IOU_THRESHOLD], np.float32)),
        _const("pp/score_thr", np.array([SCORE_THRESHOLD], np.float32)),
        _const("pp/img_cls", np.array([0, 1], np.int64)),
        _const("pp/img_box", np.array([0, 2], np.int64)),
        _const("pp/axis1", np.array([1], np.int64)),
    ]
    nodes = []
    for kind in ("cls", "reg", "ctr"):
        flat = []
        for s in STRIDES:
            nodes.append(helper.make_node("Reshape", [f"{kind}_s{s}", f"pp/shape_{kind}"], [f"pp/{kind}_s{s}_flat"],
                                          name=f"pp/Reshape_{kind}_s{s}"))
            flat.append(f"pp/{kind}_s{s}_flat")
        nodes.append(helper.make_node("Concat", flat, [f"pp/{kind}_all"], axis=2, name=f"pp/Concat_{kind}"))
    nodes += [
        helper.make_node("Sigmoid", ["pp/cls_all"], ["pp/cls_prob"], name="pp/Sigmoid_cls"),
        helper.make_node("Sigmoid", ["pp/ctr_all"], ["pp/ctr_prob"], name="pp/Sigmoid_ctr"),
        helper.make_node("Mul", ["pp/cls_prob", "pp/ctr_prob"], ["pp/score_sq"], name="pp/Mul_score"),
        helper.make_node("Sqrt", ["pp/score_sq"], ["pp/scores"], name="pp/Sqrt_score"),       # [N,10,P]
        helper.make_node("Exp", ["pp/reg_all"], ["pp/reg_exp"], name="pp/Exp_reg"),
        helper.make_node("Mul", ["pp/reg_exp", "pp/strides"], ["pp/dist"], name="pp/Mul_stride"),
        helper.make_node("Mul", ["pp/dist", "pp/signs"], ["pp/offsets"], name="pp/Mul_sign"),
        helper.make_node("Add", ["pp/centres", "pp/offsets"], ["pp/corners"], name="pp/Add_centres"),
        helper.make_node("Max", ["pp/corners", "pp/zero"], ["pp/corners_lo"], name="pp/Max_clip"),
        helper.make_node("Min", ["pp/corners_lo", "pp/size"], ["pp/corners_clip"], name="pp/Min_clip"),
        helper.make_node("Transpose", ["pp/corners_clip"], ["pp/boxes"], perm=[0, 2, 1], name="pp/Transpose_boxes"),
        helper.make_node("NonMaxSuppression", ["pp/boxes", "pp/scores", "pp/max_per_class", "pp/iou", "pp/score_thr"],
                         ["pp/selected"], center_point_box=0, name="pp/NonMaxSuppression"),     # [K,3] (n, c, p)
        helper.make_node("GatherND", ["pp/scores", "pp/selected"], ["pp/sel_score"], name="pp/GatherND_score"),
        helper.make_node("Unsqueeze", ["pp/sel_score", "pp/axis1"], ["pp/sel_score_col"], name="pp/Unsqueeze_score"),
        helper.make_node("Gather", ["pp/selected", "pp/img_box"], ["pp/sel_img_box"], axis=1, name="pp/Gather_box_idx"),
        helper.make_node("GatherND", ["pp/boxes", "pp/sel_img_box"], ["pp/sel_boxes"], name="pp/GatherND_boxes"),
        helper.make_node("Gather", ["pp/selected", "pp/img_cls"], ["pp/sel_img_cls"], axis=1, name="pp/Gather_img_cls"),
        helper.make_node("Cast", ["pp/sel_img_cls"], ["pp/sel_img_cls_f"], to=TensorProto.FLOAT, name="pp/Cast_img_cls"),
        helper.make_node("Concat", ["pp/sel_img_cls_f", "pp/sel_score_col", "pp/sel_boxes"], ["detections"], axis=1,
                         name="pp/Concat_detections"),
    ]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["K", 7]))
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(net: nn.Module, path: Path, dynamo: bool = False) -> None:
    """Export the raw head outputs (dynamic batch), then append the post-processing nodes.

    ``dynamo=False``: the legacy exporter at ``OPSET``; ``dynamo=True``: the dynamo exporter at
    opset 18, the weights inside the one file (no external ``.data``)."""
    tmp = path.with_suffix(".raw.onnx")
    # eval mode, set on the wrapper: the legacy exporter restores the wrapper's mode to the whole
    # module tree afterwards, so a fresh (training-mode) wrapper would leave ``net`` in training mode
    raw = _Raw(net).eval()
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(raw, (torch.zeros(2, 1, IMAGE, IMAGE),), dynamo=True, opset_version=18,
                                 input_names=["input"], output_names=RAW_NAMES, dynamic_shapes=({0: batch},))
        prog.save(str(tmp), external_data=False)
    else:
        torch.onnx.export(raw, (torch.zeros(1, 1, IMAGE, IMAGE),), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=RAW_NAMES,
                          dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in RAW_NAMES}})
    model = append_postprocess(onnx.load(str(tmp)))
    tmp.unlink()
    onnx.save(model, str(path))


# ------------------------------------------------------------- numpy reference + metrics
def decode_reference(raw: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Numpy decoding of raw head outputs: boxes [N,P,4] and scores [N,10,P]."""
    n = raw[0].shape[0]
    cls, reg, ctr = (np.concatenate([r.reshape(n, r.shape[1], -1) for r in raw[k::3]], 2) for k in range(3))
    sig = lambda z: 1 / (1 + np.exp(-z))
    scores = np.sqrt(sig(cls) * sig(ctr))
    loc, stride = locations()
    d = np.exp(reg) * stride[None, None]
    boxes = np.stack([loc[:, 0] - d[:, 0], loc[:, 1] - d[:, 1], loc[:, 0] + d[:, 2], loc[:, 1] + d[:, 3]], -1)
    return np.clip(boxes, 0, IMAGE).astype(np.float32), scores.astype(np.float32)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [A,4] against b [B,4] (x1, y1, x2, y2)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda z: np.prod(np.clip(z[:, 2:] - z[:, :2], 0, None), -1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def nms_reference(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-image, per-class greedy NMS (ONNX semantics) -> detections [K,7]."""
    rows = []
    for i in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            keep_idx = np.nonzero(scores[i, c] > SCORE_THRESHOLD)[0]
            order = keep_idx[np.argsort(-scores[i, c, keep_idx], kind="stable")]
            kept: list[int] = []
            for j in order:
                if len(kept) >= MAX_PER_CLASS:
                    break
                if not kept or iou_matrix(boxes[i, j][None], boxes[i, kept]).max() <= IOU_THRESHOLD:
                    kept.append(int(j))
            rows += [[i, c, scores[i, c, j], *boxes[i, j]] for j in kept]
    return np.array(rows, np.float32).reshape(-1, 7)


def average_precision(dets: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_image: np.ndarray,
                      iou_thr: float) -> float:
    """COCO-style AP (101-point interpolation), mean over classes that have ground truth."""
    aps = []
    for c in np.unique(gt_labels):
        g_mask = gt_labels == c
        gb, gi = gt_boxes[g_mask], gt_image[g_mask]
        d = dets[dets[:, 1] == c]
        d = d[np.argsort(-d[:, 2], kind="stable")]
        used = np.zeros(len(gb), bool)
        tp = np.zeros(len(d))
        for k, row in enumerate(d):
            cand = np.nonzero((gi == int(row[0])) & ~used)[0]
            if len(cand):
                ious = iou_matrix(row[None, 3:7], gb[cand])[0]
                best = int(np.argmax(ious))
                if ious[best] >= iou_thr:
                    used[cand[best]] = True
                    tp[k] = 1
        ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
        recall = ctp / len(gb)
        precision = ctp / np.maximum(ctp + cfp, 1e-12)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        pts = np.linspace(0, 1, 101)
        idx = np.searchsorted(recall, pts, side="left")
        aps.append(float(np.mean([precision[j] if j < len(precision) else 0.0 for j in idx])))
    return float(np.mean(aps))


def mean_ap(dets: np.ndarray, scenes: dict[str, np.ndarray]) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) of detections [K,7] against a scenes dict."""
    args = (scenes["boxes"].astype(np.float32), scenes["box_labels"], scenes["box_image"])
    ap50 = average_precision(dets, *args, 0.5)
    ap = float(np.mean([average_precision(dets, *args, t) for t in np.linspace(0.5, 0.95, 10)]))
    return ap50, ap


def onnx_detections(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The ONNX model's detections over ``x`` in batches, image indices made global."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(x), batch):
        d = sess.run(["detections"], {"input": x[i:i + batch]})[0].copy()
        d[:, 0] += i
        out.append(d)
    return np.concatenate(out)


def verify_postprocess(path: Path, x: np.ndarray) -> float:
    """Max |difference| between the ONNX detections and the numpy reference on ``x`` (raises if sets differ)."""
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in RAW_NAMES)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(["detections", *RAW_NAMES], {"input": x})
    got, ref = outs[0], nms_reference(*decode_reference(outs[1:]))
    if got.shape != ref.shape:
        raise AssertionError(f"ONNX gave {got.shape[0]} detections, the reference {ref.shape[0]}")
    key = lambda d: d[np.lexsort((-d[:, 2], d[:, 1], d[:, 0]))]
    diff = float(np.abs(key(got) - key(ref)).max()) if len(got) else 0.0
    if diff > 1e-3:
        raise AssertionError(f"ONNX post-processing differs from the reference by {diff}")
    return diff


def snn_eval(path: Path, calib: Path, out: Path, test: dict[str, np.ndarray], n: int, Ts: list[int], iters: int) -> None:
    """Compile with ann2snn and print the SNN's mAP on the first ``n`` test scenes by T."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    keep = test["box_image"] < n
    sub = {"input": test["input"][:n], "boxes": test["boxes"][keep], "box_labels": test["box_labels"][keep],
           "box_image": test["box_image"][keep]}
    t = time.perf_counter()
    ann2snn.compile(str(path), str(calib), str(out), iters=iters, threads=1)
    print(f"compiled in {time.perf_counter() - t:.1f} s -> {out}")
    ann = onnx_detections(path, sub["input"])
    ap50, ap = mean_ap(ann, sub)
    print(f"ANN on {n} scenes: mAP@0.5 {ap50:.4f}, mAP@[.5:.95] {ap:.4f}")
    sess = SpikingSession(str(out), threads=1)
    t = time.perf_counter()
    res = sess.run_many({"input": sub["input"]}, Ts)
    print(f"SNN simulated {max(Ts)} steps in {time.perf_counter() - t:.1f} s")
    for T in Ts:
        ap50, ap = mean_ap(res[T]["detections"], sub)
        print(f"SNN T={T}: mAP@0.5 {ap50:.4f}, mAP@[.5:.95] {ap:.4f}, detections {len(res[T]['detections'])}")


def detection_parser(description: str, out: Path, snn_out: Path, scenes: int) -> argparse.ArgumentParser:
    """The options shared by the detector build scripts (training, data, evaluation, ``--snn``)."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--scenes", type=int, default=scenes, help="training scenes seen (half of them mirrored)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=2048, help="scenes generated at a time")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a loaded 2-core machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", type=Path, default=here / "data" / "scenes_test.npz")
    p.add_argument("--calib", type=Path, default=here / "data" / "scenes_calib.npz")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing --out")
    p.add_argument("--snn", type=int, default=0, help="also compile and evaluate the SNN on this many test scenes")
    p.add_argument("--snn-T", default="32,64,128,256")
    p.add_argument("--snn-iters", type=int, default=200)
    p.add_argument("--snn-out", type=Path, default=snn_out, help="where the SNN is written")
    return p


def train_timed(net: nn.Module, args: argparse.Namespace) -> None:
    """``train`` with the parsed options (seeded), printing the parameter count and the time taken."""
    print(f"parameters: {sum(q.numel() for q in net.parameters()):,}")
    t = time.perf_counter()
    train(net, args.scenes, args.batch, args.chunk, args.lr, 1000 + args.seed)
    print(f"training: {time.perf_counter() - t:.0f} s")


def report(path: Path, args: argparse.Namespace, snn_out: Path | None = None) -> None:
    """Check an exported detector's post-processing against the numpy reference, print its mAP on
    the test scenes and, with ``--snn N``, compile it and print the SNN's mAP by T."""
    test = dict(np.load(args.test))
    diff = verify_postprocess(path, test["input"][:16])
    print(f"{path.name}: ONNX post-processing matches the numpy reference on 16 scenes (max |diff| {diff:.2e})")
    dets = onnx_detections(path, test["input"])
    ap50, ap = mean_ap(dets, test)
    print(f"ANN on {len(test['input'])} test scenes: mAP@0.5 {ap50:.4f}, mAP@[.5:.95] {ap:.4f}")
    if args.snn:
        snn_eval(path, args.calib, snn_out or args.snn_out, test, args.snn, [int(v) for v in args.snn_T.split(",")],
                 args.snn_iters)


def main() -> None:
    """Train, export, verify the post-processing, report the ANN's (and optionally SNN's) mAP."""
    here = Path(__file__).resolve().parent
    args = detection_parser(__doc__.split("\n\n")[0], here / "det_fcos.onnx", Path("/tmp/det_fcos.snn.onnx"),
                            80000).parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    if not args.eval_only:
        torch.manual_seed(args.seed)
        net = FCOS()
        train_timed(net, args)
        export_onnx(net, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    report(args.out, args)


if __name__ == "__main__":
    main()
