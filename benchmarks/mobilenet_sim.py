"""A transparent re-implementation of the ann2snn SNN of a Clip/ReLU network, for diagnostics.

ann2snn folds thresholds into weights and hides the per-step values; to find where the
MobileNetV2 error comes from we need the thresholds as *inputs* (so that one session serves
every calibration), the per-layer firing rates and the per-step outputs (so that every
readout delay t0 is evaluated from one simulation). This module builds, from the ANN's
ONNX file, two onnxruntime models:

* **clipped ANN**: every activation site ``Clip(0, c)`` / ``Relu`` becomes
  ``min(ReLU(z), θ)`` with θ a graph input: the SNN's T → ∞ limit for given thresholds;
* **step model**: every site becomes an IF neuron (``v' = v + z``, spike at ``v' ≥ θ``,
  reset by subtraction, spike value θ, as ``ann2snn::IFNeuron``; optionally signed, as
  ``ann2snn::SignedIFNeuron``) with its membrane and,
  optionally, a spike accumulator and accumulators of chosen analog tensors as state
  inputs/outputs; run with IOBinding, one call per step.

Its outputs match ann2snn's SpikingSession on the same thresholds (checked by
``benchmarks/mobilenet_study.py check``). Only onnx, onnxruntime and numpy are needed.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mobilenet_v2.onnx"
DEAD = np.float32(1e30)


@dataclass
class Site:
    """An activation site of the ANN."""

    node: str
    pre: str
    post: str
    shape: tuple[int, ...]  # per sample, [C, H, W]
    cap: float | None


def _opts(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Clip(0, c) / Relu nodes with their static per-sample shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim[1:])
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    sites = []
    for n in model.graph.node:
        if n.op_type == "Relu":
            sites.append(Site(n.name, n.input[0], n.output[0], shapes[n.input[0]], None))
        elif n.op_type == "Clip" and float(consts[n.input[1]]) == 0.0:
            sites.append(Site(n.name, n.input[0], n.output[0], shapes[n.input[0]], float(consts[n.input[2]])))
    return sites


def linear_tensors(model: onnx.ModelProto, sites: list[Site]) -> list[str]:
    """Analog tensors between neurons that feed no neuron directly: projection outputs, residual sums."""
    pre = {s.pre for s in sites}
    first_site = next(i for i, n in enumerate(model.graph.node) if n.name == sites[0].node)
    out = []
    for n in model.graph.node[first_site:]:
        if n.op_type in ("Conv", "Add") and n.output[0] not in pre and n.output[0] not in {o.name for o in model.graph.output}:
            out.append(n.output[0])
    return out


class Sim:
    """Clipped-ANN and IF-step sessions of one ANN, thresholds given per call."""

    def __init__(self, path: Path = MODEL, threads: int = 2, level: str = "all") -> None:
        self.model = onnx.load(str(path))
        self.sites = find_sites(self.model)
        self.linear = linear_tensors(self.model, self.sites)
        self.input = self.model.graph.input[0].name
        self.output = self.model.graph.output[0].name
        self.threads = threads
        self.level = level
        self._clipped = self._build_clipped()
        self._ann = ort.InferenceSession(str(path), _opts(threads), providers=["CPUExecutionProvider"])
        self._step: dict[tuple, ort.InferenceSession] = {}

    # -- graph building -------------------------------------------------------------------
    def _replace_sites(self, make: callable) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        names = {s.node: s for s in self.sites}
        nodes = []
        for n in m.graph.node:
            if n.name in names:
                nodes += make(names[n.name], n)
            else:
                nodes.append(n)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        return m

    def _build_clipped(self) -> ort.InferenceSession:
        def make(site: Site, n: onnx.NodeProto) -> list[onnx.NodeProto]:
            th = f"th/{site.node}"
            return [helper.make_node("Relu", [site.pre], [f"{site.post}/relu"]),
                    helper.make_node("Min", [f"{site.post}/relu", th], [site.post])]

        m = self._replace_sites(make)
        for s in self.sites:
            m.graph.input.append(helper.make_tensor_value_info(f"th/{s.node}", TensorProto.FLOAT, None))
        m.graph.output.extend(helper.make_tensor_value_info(s.post, TensorProto.FLOAT, None) for s in self.sites)
        m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in self.linear)
        return ort.InferenceSession(m.SerializeToString(), _opts(self.threads), providers=["CPUExecutionProvider"])

    def _build_quantised(self) -> ort.InferenceSession:
        """Sites become θ/T · clip(floor(z·T/θ + v0), 0, T): the rate a constant input would give."""
        def make(site: Site, n: onnx.NodeProto) -> list[onnx.NodeProto]:
            k = site.node
            return [helper.make_node("Mul", [site.pre, f"k/{k}"], [f"{k}/zs"]),
                    helper.make_node("Add", [f"{k}/zs", "v0"], [f"{k}/zs0"]),
                    helper.make_node("Floor", [f"{k}/zs0"], [f"{k}/fl"]),
                    helper.make_node("Max", [f"{k}/fl", "zero"], [f"{k}/lo"]),
                    helper.make_node("Min", [f"{k}/lo", "T"], [f"{k}/q"]),
                    helper.make_node("Mul", [f"{k}/q", f"u/{k}"], [site.post])]

        m = self._replace_sites(make)
        f = TensorProto.FLOAT
        for s in self.sites:
            per_c = [1, s.shape[0], 1, 1] if len(s.shape) == 3 else [1, s.shape[0]]
            m.graph.input.extend([helper.make_tensor_value_info(f"{p}/{s.node}", f, per_c) for p in ("k", "u")])
        m.graph.input.extend([helper.make_tensor_value_info(p, f, []) for p in ("v0", "T")])
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
        return ort.InferenceSession(m.SerializeToString(), _opts(self.threads), providers=["CPUExecutionProvider"])

    def quantised(self, x: np.ndarray, thetas: dict[str, np.ndarray], T: int, v0: float = 0.5,
                  batch: int = 16) -> np.ndarray:
        """Logits of the ANN with each site quantised to T levels of θ/T (floor after a v0 shift)."""
        if not hasattr(self, "_quant"):
            self._quant = self._build_quantised()
        feeds = {"v0": np.array(v0, np.float32), "T": np.array(T, np.float32)}
        for s in self.sites:
            th = self._th(thetas[s.node], s)
            feeds[f"k/{s.node}"] = np.where(th > 0, T / np.where(th > 0, th, 1), 0).astype(np.float32)
            feeds[f"u/{s.node}"] = (th / T).astype(np.float32)
        return np.concatenate([self._quant.run([self.output], {self.input: x[i:i + batch], **feeds})[0]
                               for i in range(0, len(x), batch)])

    def _build_ltb(self, channel: bool, cap: bool, eta: float) -> ort.InferenceSession:
        """LTB as ann2snn's pass does it: θ' = θ + 2η·mean ReLU(z − θ), output min(ReLU(z), θ')."""
        def make(site: Site, n: onnx.NodeProto) -> list[onnx.NodeProto]:
            k = site.node
            axes = [0, 2, 3] if channel and len(site.shape) == 3 else [0] if channel else list(range(len(site.shape) + 1))
            out = [helper.make_node("Sub", [site.pre, f"th/{k}"], [f"{k}/d"]),
                   helper.make_node("Relu", [f"{k}/d"], [f"{k}/e"]),
                   helper.make_node("ReduceMean", [f"{k}/e"], [f"{k}/m"], axes=axes, keepdims=1),
                   helper.make_node("Mul", [f"{k}/m", "two_eta"], [f"{k}/step"]),
                   helper.make_node("Add", [f"th/{k}", f"{k}/step"], [f"{k}/thn0" if cap else f"thn/{k}"])]
            if cap:
                out.append(helper.make_node("Min", [f"{k}/thn0", "cap"], [f"thn/{k}"]))
            out += [helper.make_node("Relu", [site.pre], [f"{k}/r"]),
                    helper.make_node("Min", [f"{k}/r", f"thn/{k}"], [site.post])]
            return out

        m = self._replace_sites(make)
        f = TensorProto.FLOAT
        for s in self.sites:
            shape = ([1, s.shape[0], 1, 1] if len(s.shape) == 3 else [1, s.shape[0]]) if channel else \
                [1] * (len(s.shape) + 1)
            m.graph.input.append(helper.make_tensor_value_info(f"th/{s.node}", f, shape))
            m.graph.output.append(helper.make_tensor_value_info(f"thn/{s.node}", f, shape))
        m.graph.initializer.append(numpy_helper.from_array(np.array(2 * eta, np.float32), "two_eta"))
        m.graph.initializer.append(numpy_helper.from_array(np.array(6.0, np.float32), "cap"))
        m.opset_import[0].version = min(m.opset_import[0].version, 17)
        return ort.InferenceSession(m.SerializeToString(), _opts(self.threads), providers=["CPUExecutionProvider"])

    def ltb(self, batches: Iterable[np.ndarray], channel: bool = True, cap: bool = True, eta: float = 1.0,
            snapshots: Sequence[int] = (), on_snapshot: callable | None = None) -> dict[str, np.ndarray]:
        """Run LTB from θ = 0 over ``batches``; ``on_snapshot(k, thetas)`` after k batches for k in snapshots."""
        sess = self._build_ltb(channel, cap, eta)
        def shape(s: Site) -> tuple[int, ...]:
            if not channel:
                return (1,) * (len(s.shape) + 1)
            return (1, s.shape[0], 1, 1) if len(s.shape) == 3 else (1, s.shape[0])

        th = {s.node: np.zeros(shape(s), np.float32) for s in self.sites}
        names = [f"thn/{s.node}" for s in self.sites]
        for k, xb in enumerate(batches, start=1):
            res = sess.run(names, {self.input: xb, **{f"th/{n}": v for n, v in th.items()}})
            th = {s.node: r for s, r in zip(self.sites, res)}
            if k in snapshots and on_snapshot is not None:
                on_snapshot(k, {n: v.reshape(-1).copy() for n, v in th.items()})
        return {n: v.reshape(-1) for n, v in th.items()}

    def _build_step(self, count: bool, linear: bool, signed: bool = False) -> ort.InferenceSession:
        def make(site: Site, n: onnx.NodeProto) -> list[onnx.NodeProto]:
            k = site.node
            # a spike of a live neuron carries its threshold; dead ones (θ = 1e30) never fire,
            # so Where(fire, θ, 0) is both the discharge and the spike value (4 ops, not 6)
            out = [helper.make_node("Add", [f"v/{k}", site.pre], [f"{k}/charged"]),
                   helper.make_node("GreaterOrEqual", [f"{k}/charged", f"fire/{k}"], [f"{k}/ge"])]
            if signed:  # ann2snn::SignedIFNeuron: -θ when v < 0 and the running sum c of spikes is > 0
                out += [helper.make_node("Less", [f"{k}/charged", f"zero/{k}"], [f"{k}/lt"]),
                        helper.make_node("Greater", [f"c/{k}", f"zero/{k}"], [f"{k}/has"]),
                        helper.make_node("And", [f"{k}/lt", f"{k}/has"], [f"{k}/neg"]),
                        helper.make_node("Neg", [f"fire/{k}"], [f"{k}/nfire"]),
                        helper.make_node("Where", [f"{k}/neg", f"{k}/nfire", f"zero/{k}"], [f"{k}/nv"]),
                        helper.make_node("Where", [f"{k}/ge", f"fire/{k}", f"{k}/nv"], [site.post])]
            else:
                out.append(helper.make_node("Where", [f"{k}/ge", f"fire/{k}", f"zero/{k}"], [site.post]))
            out.append(helper.make_node("Sub", [f"{k}/charged", site.post], [f"vn/{k}"]))
            if count:
                out.append(helper.make_node("Add", [f"c/{k}", site.post], [f"cn/{k}"]))
            return out

        m = self._replace_sites(make)
        f = TensorProto.FLOAT
        for s in self.sites:
            full, per_c = ["N", *s.shape], [1, s.shape[0], 1, 1] if len(s.shape) == 3 else [1, s.shape[0]]
            m.graph.input.append(helper.make_tensor_value_info(f"v/{s.node}", f, full))
            m.graph.input.append(helper.make_tensor_value_info(f"fire/{s.node}", f, per_c))
            m.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), f"zero/{s.node}"))
            m.graph.output.append(helper.make_tensor_value_info(f"vn/{s.node}", f, full))
            if count:
                m.graph.input.append(helper.make_tensor_value_info(f"c/{s.node}", f, full))
                m.graph.output.append(helper.make_tensor_value_info(f"cn/{s.node}", f, full))
        if linear:
            shapes = self._linear_shapes()
            for t in self.linear:
                m.graph.node.append(helper.make_node("Add", [f"a/{t}", t], [f"an/{t}"]))
                m.graph.input.append(helper.make_tensor_value_info(f"a/{t}", f, ["N", *shapes[t]]))
                m.graph.output.append(helper.make_tensor_value_info(f"an/{t}", f, ["N", *shapes[t]]))
        m = onnx.shape_inference.infer_shapes(m)
        so = _opts(self.threads)
        if self.level != "all":
            so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[self.level]
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def _linear_shapes(self) -> dict[str, tuple[int, ...]]:
        inferred = onnx.shape_inference.infer_shapes(self.model)
        return {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim[1:]) for vi in inferred.graph.value_info}

    # -- running --------------------------------------------------------------------------
    def ann(self, x: np.ndarray, batch: int = 16) -> np.ndarray:
        """The original ANN's logits."""
        return np.concatenate([self._ann.run([self.output], {self.input: x[i:i + batch]})[0]
                               for i in range(0, len(x), batch)])

    def clipped(self, x: np.ndarray, thetas: dict[str, np.ndarray], record: bool = False
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of the ANN with every site min(ReLU(z), θ); with ``record`` also every site's
        output and every linear tensor."""
        feeds = {f"th/{s.node}": self._th(thetas[s.node], s) for s in self.sites}
        names = [self.output] + ([s.post for s in self.sites] + self.linear if record else [])
        if record:
            res = self._clipped.run(names, {self.input: x, **feeds})
            return res[0], dict(zip(names[1:], res[1:]))
        return np.concatenate([self._clipped.run(names, {self.input: x[i:i + 16], **feeds})[0]
                               for i in range(0, len(x), 16)]), {}

    @staticmethod
    def _th(theta: np.ndarray, s: Site) -> np.ndarray:
        th = np.broadcast_to(np.asarray(theta, np.float32).reshape(-1), (s.shape[0],))
        return np.ascontiguousarray(th.reshape((1, -1, 1, 1) if len(s.shape) == 3 else (1, -1)))

    def snn(self, x: np.ndarray, thetas: dict[str, np.ndarray], T: int, v0: float | dict[str, np.ndarray] = 0.5,
            count: bool = False, linear: bool = False, signed: bool = False) -> dict[str, np.ndarray]:
        """Simulate T steps. Returns ``steps`` [T, B, classes] (the output at every step) and,
        with ``count``, ``rate/<site>`` (spikes·θ averaged over T), with ``linear``,
        ``mean/<tensor>`` (the analog tensor averaged over T). ``signed``: signed IF neurons
        (they need the spike sums, so ``count`` is implied)."""
        count = count or signed
        key = (count, linear, signed)
        if key not in self._step:
            self._step[key] = self._build_step(count, linear, signed)
        sess = self._step[key]
        B = len(x)
        io = sess.io_binding()
        io.bind_cpu_input(self.input, np.ascontiguousarray(x))
        cur, nxt = {}, {}
        consts = []
        for s in self.sites:
            th = self._th(thetas[s.node], s)
            fire = np.where(th > 0, th, DEAD).astype(np.float32)
            val = np.where(th > 0, th, 0).astype(np.float32)
            consts += [fire, val]
            io.bind_cpu_input(f"fire/{s.node}", fire)
            frac = v0[s.node] if isinstance(v0, dict) else v0
            cur[f"v/{s.node}"] = np.ascontiguousarray(np.broadcast_to(fire * np.float32(frac), (B,) + s.shape),
                                                      dtype=np.float32)
            nxt[f"v/{s.node}"] = np.empty_like(cur[f"v/{s.node}"])
            if count:
                cur[f"c/{s.node}"] = np.zeros((B,) + s.shape, np.float32)
                nxt[f"c/{s.node}"] = np.empty_like(cur[f"c/{s.node}"])
        if linear:
            _, rec = self.clipped(x[:1], thetas, record=True)
            for t in self.linear:
                cur[f"a/{t}"] = np.zeros((B,) + rec[t].shape[1:], np.float32)
                nxt[f"a/{t}"] = np.empty_like(cur[f"a/{t}"])
        out_name = {k: k.split("/", 1)[0] + "n/" + k.split("/", 1)[1] for k in cur}
        steps = []
        for _ in range(T):
            for k, now in cur.items():
                io.bind_input(k, "cpu", 0, np.float32, list(now.shape), now.ctypes.data)
                io.bind_output(out_name[k], "cpu", 0, np.float32, list(nxt[k].shape), nxt[k].ctypes.data)
            io.bind_output(self.output)
            sess.run_with_iobinding(io)
            steps.append(io.copy_outputs_to_cpu()[-1].copy())
            cur, nxt = nxt, cur
        res = {"steps": np.stack(steps)}
        {s.node: self._th(thetas[s.node], s) for s in self.sites}
        for s in self.sites:
            if count:
                res[f"rate/{s.node}"] = cur[f"c/{s.node}"] / T  # the accumulator sums spike values
        if linear:
            for t in self.linear:
                res[f"mean/{t}"] = cur[f"a/{t}"] / T
        del consts
        return res


def readout(steps: np.ndarray, T: int, t0: int, min_window: int = 4) -> np.ndarray:
    """Mean of the per-step outputs over [start, T) with ann2snn's rule for the window start."""
    start = t0 if T >= t0 + min_window else max(T - min_window, 0)
    return steps[start:T].astype(np.float64).mean(axis=0)


def batches_of(x: np.ndarray, iters: int, batch: int, seed: int = 0) -> Iterable[np.ndarray]:
    """``iters`` batches of ``batch`` samples from ``x``, drawn as ann2snn's CalibrationSource does."""
    n = len(x)
    batch = min(batch, n)
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(iters):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos:pos + batch])
        pos += batch
        yield x[idx]


def thetas_from_compiled(snn: onnx.ModelProto, sites: list[Site]) -> dict[str, np.ndarray]:
    """The per-site thresholds of an ann2snn-compiled model (dead channels as 0), by ANN node name."""
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    inits = {i.name: i for i in snn.graph.initializer}
    out = {}
    for n in meta["neurons"]:
        node = n["node"].removesuffix("/IF")
        th = numpy_helper.to_array(inits[n["threshold"]]).astype(np.float32).reshape(-1)
        out[node] = np.where(th >= DEAD, 0, th).astype(np.float32)
    missing = [s.node for s in sites if s.node not in out]
    if missing:
        raise KeyError(f"compiled model has no thresholds for {missing[:3]}")
    return out
