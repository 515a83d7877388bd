"""Round trips of ann2snn's NIR export through third-party NIR readers (issue 18).

Each model is compiled (``ann2snn.compile``, defaults), exported (``export_nir(...,
allow_approximation=True)``), read back with ``nir.read`` and loaded by a reader from PyPI:

* ``sinabs``: sinabs 3.1.3's own node importer (``sinabs.nir._import_sinabs_module``, what
  ``sinabs.from_nir`` uses), run by ``nirtorch.load``; IF -> ``IAFSqueeze`` (reset by
  subtraction, fires at v >= θ, the same rule as ann2snn);
* ``snntorch``: snnTorch 1.0.0's node importer (``snntorch.import_nir._nir_to_snntorch_module``,
  what ``import_from_nir`` uses), run by ``nirtorch.nir_to_torch``; IF -> ``snn.Leaky``;
* ``norse``: Norse 1.1.0's ``norse.torch.from_nir``; IF -> ``IAFCell`` (reset to v_reset).

Every reader is run one step at a time on the same images for T steps; the ``Output`` node's
values are averaged over ann2snn's readout window [t0, T) (graph metadata) and the top-1
class compared with ``SpikingSession(model).run`` on the compiled model. Spikes per IF layer
are counted by forward hooks and compared with ann2snn's (``reference_steps``; a spike is
recovered from the membrane as ``v_prev + I - v``, see ``ann2snn_spike_counts``).

What the readers cannot read, and what the benchmark therefore configures (each row says):

* ``maxpool``: NIR 1.0 has no max pooling; the export writes an ``AvgPool2d`` placeholder
  marked ``ann2snn.placeholder_for = MaxPool``. ``cummax`` replaces it, as its metadata
  describes, by a max pooling of the running sum passing on the increment of the max
  (exact for ann2snn's cumulative and constant-current modes); ``placeholder`` keeps the
  reader's AvgPool2d. sinabs has no AvgPool2d importer at all, so it always gets ``cummax``.
* ``Scale`` (input normalisation) has no importer in sinabs or snnTorch: a one-line module
  multiplying by ``node.scale`` is supplied.
* neuron configuration per reader (``v0``: the initial membrane ``ann2snn.v_init``; ``floor``:
  sinabs's ``min_v_mem = -θ`` kept or removed; ``beta``: snnTorch's leak).

Run (needs ``pip install torch==2.13.0 nir==1.0.8 nirtorch==2.6 snntorch==1.0.0 norse==1.1.0 matplotlib && pip install --no-deps sinabs==3.1.3``):

    python benchmarks/nir_readers.py [--limit N] [-T 32,128] [--models mnist,digits,fashion]
        [--readers sinabs,snntorch,norse] [--markdown benchmarks/results/nir_readers.md]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mnist": ("mnist_cnn.onnx", "mnist_calib.npz", "mnist_test.npz"),
    "digits": ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
    "fashion": ("fashion_vgg.onnx", "fashion_calib.npz", "fashion_test.npz"),
}

# reader -> list of (configuration name, options)
CONFIGS = {
    "sinabs": [("matched (SingleSpike, v0, no floor)", dict(v0=True, floor=False, pool="cummax")),
               ("sinabs defaults (MultiSpike, v0 = 0, min_v_mem = -θ)",
                dict(v0=False, floor=True, pool="cummax", single=False))],
    "snntorch": [("matched (beta = 1, v0)", dict(v0=True, beta=1.0, pool="cummax")),
                 ("snnTorch defaults (beta = 0.9, v0 = 0)", dict(v0=False, beta=None, pool="cummax")),
                 ("beta = 1, v0, AvgPool2d placeholder", dict(v0=True, beta=1.0, pool="placeholder"))],
    "norse": [("norse IAF (reset to 0), v0", dict(v0=True, pool="cummax")),
              ("norse defaults (reset to 0, v0 = 0)", dict(v0=False, pool="cummax"))],
}


def compile_and_export(model: str, workdir: Path) -> tuple[Path, Path]:
    """The compiled model and its NIR file for one of MODELS (compiled once per workdir)."""
    import ann2snn
    from ann2snn.export.nir import export_nir

    onnx_name, calib, _ = MODELS[model]
    snn = workdir / f"{model}.snn.onnx"
    nir_path = workdir / f"{model}.nir"
    if not snn.exists():
        ann2snn.compile(ROOT / "models" / onnx_name, ROOT / "models" / "data" / calib, snn)
    if not nir_path.exists():
        export_nir(snn, nir_path, allow_approximation=True)
    return snn, nir_path


def test_data(model: str, limit: int) -> tuple[str, np.ndarray]:
    d = np.load(ROOT / "models" / "data" / MODELS[model][2])
    key = next(k for k in d.files if k != "label")
    return key, np.ascontiguousarray(d[key][:limit])


# --- modules the readers lack ---------------------------------------------------------------


def _torch_modules():
    import torch

    class Scale(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))

        def forward(self, x):
            return x * self.scale

    class CumMaxPool2d(torch.nn.Module):
        """ann2snn's cumulative max pooling: max pool of the running sum, emits the increment."""

        def __init__(self, kernel_size, stride, padding):
            super().__init__()
            self.pool = torch.nn.MaxPool2d(tuple(int(k) for k in kernel_size), tuple(int(s) for s in stride),
                                           tuple(int(p) for p in padding))
            self.acc = self.max = None

        def reset(self):
            self.acc = self.max = None

        def forward(self, x):
            self.acc = x if self.acc is None else self.acc + x
            m = self.pool(self.acc)
            out = m if self.max is None else m - self.max
            self.max = m
            return out

    return Scale, CumMaxPool2d


def _common(node, pool: str, flatten: bool = False):
    """A module for the nodes the readers cannot import (None: leave it to the reader);
    ``flatten``: also NIR's Flatten, for readers that flatten the batch dimension too."""
    import nir

    Scale, CumMaxPool2d = _torch_modules()
    if isinstance(node, nir.Scale):
        return Scale(node.scale)
    if isinstance(node, nir.AvgPool2d) and node.metadata.get("ann2snn.placeholder_for") == "MaxPool" \
            and pool == "cummax":
        return CumMaxPool2d(node.kernel_size, node.stride, node.padding)
    if flatten and isinstance(node, nir.Flatten):
        return _flatten(node)
    return None


def _flatten(node):
    """NIR's Flatten counts dimensions without the batch (sinabs adds 1; snnTorch and Norse do not)."""
    import torch

    start = node.start_dim + 1 if node.start_dim >= 0 else node.start_dim
    end = node.end_dim + 1 if node.end_dim >= 0 else node.end_dim
    return torch.nn.Flatten(start, end)


# --- readers ----------------------------------------------------------------------------------


class Run:
    """A loaded reader: ``step(x)`` returns the Output value of one step; ``if_layers`` the
    IF modules in graph order (name -> module) whose outputs are spikes."""

    def __init__(self, module, step, if_layers):
        self.module, self.step, self.if_layers = module, step, if_layers


def load_sinabs(graph, batch: int, v0: bool, floor: bool, pool: str, single: bool = True) -> Run:
    import nirtorch
    import torch
    import sinabs.layers as sl
    from sinabs.activation import SingleSpike
    from sinabs.nir import _import_sinabs_module

    def node_map(node):
        mod = _common(node, pool)
        return mod if mod is not None else _import_sinabs_module(node, batch_size=batch, num_timesteps=None)

    module = nirtorch.load(graph, node_map, return_state=False)
    ifs = {n: m for n, m in module.named_modules() if isinstance(m, sl.IAFSqueeze)}
    for name, m in ifs.items():
        if not floor:
            m.min_v_mem = None
        if single:
            m.spike_fn = SingleSpike
    inits = _v_inits(graph, ifs)
    if v0:
        for name, m in ifs.items():
            m.v_mem = torch.as_tensor(np.broadcast_to(inits[name], (batch,) + inits[name].shape).copy())

    def step(x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    return Run(module, step, ifs)


def load_snntorch(graph, batch: int, v0: bool, beta, pool: str) -> Run:
    import nir
    import nirtorch
    import torch
    import snntorch as snn
    from snntorch.import_nir import _nir_to_snntorch_module

    thresholds = {}

    def imp(node):
        mod = _common(node, pool, flatten=True)
        if mod is not None:
            return mod
        if isinstance(node, nir.IF):  # the importer takes one threshold per layer: per-neuron ones set below
            m = _nir_to_snntorch_module(nir.IF(r=node.r, v_threshold=np.ones_like(node.v_threshold)),
                                        init_hidden=True)
            thresholds[id(m)] = torch.as_tensor(np.asarray(node.v_threshold, np.float32))
            return m
        return _nir_to_snntorch_module(node, init_hidden=True)

    node_map = {t: imp for t in (nir.Affine, nir.Linear, nir.Conv2d, nir.Flatten, nir.AvgPool2d, nir.IF, nir.Scale)}
    module = nirtorch.nir_to_torch(graph, node_map)
    ifs = {n: m for n, m in module.named_modules() if isinstance(m, snn.Leaky)}
    for m in ifs.values():
        m.threshold = thresholds[id(m)]
        m.init_hidden = True  # the importer asks for init_hidden=True but builds init_hidden=False
        if beta is not None:
            m.beta = torch.as_tensor(float(beta))
    inits = _v_inits(graph, ifs)
    if v0:
        for name, m in ifs.items():
            m.mem = torch.as_tensor(np.broadcast_to(inits[name], (batch,) + inits[name].shape).copy())
    state = {"s": None}

    def step(x):
        out = module(x) if state["s"] is None else module(x, state["s"])
        if isinstance(out, tuple):
            out, state["s"] = out
        return out

    return Run(module, step, ifs)


def load_norse(graph, batch: int, v0: bool, pool: str) -> Run:
    import nir
    import nirtorch
    import torch
    from norse.torch.module.iaf import IAFCell
    from norse.torch.functional.iaf import IAFFeedForwardState
    from norse.torch.utils.import_nir import _import_norse_module

    def node_map(node):
        mod = _common(node, pool, flatten=True)
        if mod is not None:
            return mod
        if isinstance(node, nir.AvgPool2d):  # norse has no AvgPool2d importer
            return torch.nn.AvgPool2d(tuple(node.kernel_size), tuple(node.stride), tuple(node.padding))
        return _import_norse_module(node, ignore_warnings=True, dt=1.0)

    module = nirtorch.load(graph, node_map)
    ifs = {n: m for n, m in module.named_modules() if isinstance(m, IAFCell)}
    inits = _v_inits(graph, ifs)
    if v0:
        for name, m in ifs.items():  # the cell's state on its first call
            v = torch.as_tensor(np.broadcast_to(inits[name], (batch,) + inits[name].shape).copy())
            m._ann2snn_v0 = IAFFeedForwardState(v=v)
            orig = m.forward

            def fwd(x, state=None, _orig=orig, _m=m):
                if state is None:
                    state = _m._ann2snn_v0
                return _orig(x, state)

            m.forward = fwd
    holder = {"s": None}

    def step(x):
        out, holder["s"] = module(x, holder["s"])
        return out

    return Run(module, step, ifs)


def _v_inits(graph, ifs) -> dict[str, np.ndarray]:
    """The ann2snn initial membrane of each IF module, found by its node name."""
    found = {}
    for name in ifs:
        key = next((k for k in graph.nodes if _same(k, name)), None)
        if key is None:
            raise KeyError(f"no IF node for module {name}")
        found[name] = np.asarray(graph.nodes[key].metadata["ann2snn.v_init"], np.float32)
    return found


def _same(node_name: str, module_name: str) -> bool:
    clean = lambda s: "".join(c for c in s if c.isalnum())  # noqa: E731
    return clean(node_name) == clean(module_name.split(".", 1)[-1] if module_name.startswith("nodes.") else
                                     module_name)


LOADERS = {"sinabs": load_sinabs, "snntorch": load_snntorch, "norse": load_norse}


def simulate(reader: str, nir_path: Path, x: np.ndarray, T: int, options: dict) -> tuple[np.ndarray, dict]:
    """(per-step outputs (T, N, ...), spikes per IF layer summed over steps and batch)."""
    import nir
    import torch

    graph = nir.read(str(nir_path))
    run = LOADERS[reader](graph, x.shape[0], **options)
    counts = {n: 0.0 for n in run.if_layers}

    def hook(name):
        def f(_m, _inp, out):
            z = out[0] if isinstance(out, tuple) else out
            counts[name] += float(z.sum())
        return f

    for n, m in run.if_layers.items():
        m.register_forward_hook(hook(n))
    xt = torch.as_tensor(x)
    outs = []
    with torch.no_grad():
        for _ in range(T):
            outs.append(np.asarray(run.step(xt).detach().reshape(x.shape[0], -1)))
    return np.stack(outs), counts


def readout(outs: np.ndarray, T: int, t0: int) -> np.ndarray:
    from ann2snn.runtime.reference import window_start

    return outs[window_start(T, t0):].astype(np.float64).mean(0)


def ann2snn_outputs(snn: Path, key: str, x: np.ndarray, T: int) -> np.ndarray:
    from ann2snn.runtime import SpikingSession

    sess = SpikingSession(str(snn))
    out = sess.run({key: x}, T)
    return np.asarray(next(iter(out.values()))).reshape(x.shape[0], -1)


def ann2snn_spike_counts(snn: Path, key: str, x: np.ndarray, T: int) -> dict[str, float]:
    """Spikes of each ann2snn IF node (ONNX node name -> total over steps and images): the step
    graph run as ``reference_steps`` runs it, with the neurons' spike outputs fetched too."""
    import onnx
    import onnxruntime as ort

    from ann2snn.modelio import load_model
    from ann2snn.runtime.ops import DOMAIN, IF_OP
    from ann2snn.runtime.reference import initial_states, model_metadata, state_specs

    proto = load_model(str(snn))
    meta = model_metadata(proto)
    specs = state_specs(proto, meta)
    spikes = {n.output[0]: n.name for n in proto.graph.node if n.domain == DOMAIN and n.op_type == IF_OP}
    proto.graph.output.extend(onnx.ValueInfoProto(name=o) for o in spikes)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    states = initial_states(specs, x.shape[0])
    fetch = [s[1] for s in specs] + list(spikes)
    counts = dict.fromkeys(spikes.values(), 0.0)
    for _ in range(T):
        res = sess.run(fetch, {key: x, **states})
        states = {s[0]: r for s, r in zip(specs, res)}
        for o, r in zip(spikes, res[len(specs):]):
            counts[spikes[o]] += float(r.sum())
    return counts


def _layer_diff(graph, reader_counts: dict, ours: dict) -> float:
    """Largest relative difference of the spikes per IF layer, reader against ann2snn."""
    worst = 0.0
    for name, c in reader_counts.items():
        key = next(k for k in graph.nodes if _same(k, name))
        mine = ours[graph.nodes[key].metadata["ann2snn.onnx_node"]]
        worst = max(worst, abs(c - mine) / max(mine, 1.0))
    return worst


_ANN2SNN: dict = {}


def compare(model: str, reader: str, T_list, limit: int, workdir: Path, configs=None) -> list[dict]:
    import nir

    snn, nir_path = compile_and_export(model, workdir)
    key, x = test_data(model, limit)
    graph = nir.read(str(nir_path))
    t0 = int(graph.metadata["ann2snn.readout_t0"])
    rows = []
    for T in T_list:
        cache_key = (str(snn), len(x), T)
        if cache_key not in _ANN2SNN:  # once per model and T, shared by the readers
            _ANN2SNN[cache_key] = (ann2snn_outputs(snn, key, x, T), ann2snn_spike_counts(snn, key, x, T))
        ref, ours = _ANN2SNN[cache_key]
        for cname, options in (configs or CONFIGS[reader]):
            t = time.time()
            try:
                outs, counts = simulate(reader, nir_path, x, T, options)
            except Exception as exc:  # a reader that cannot load or run the graph: reported, not hidden
                rows.append(dict(model=model, reader=reader, T=T, config=cname, agree=None,
                                 error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
                continue
            got = readout(outs, T, t0)
            rows.append(dict(model=model, reader=reader, T=T, config=cname, n=len(x),
                             agree=float((got.argmax(1) == ref.argmax(1)).mean()),
                             rel_err=float(np.abs(got - ref).mean() / max(np.abs(ref).mean(), 1e-12)),
                             spikes=int(sum(counts.values())), ann2snn_spikes=int(sum(ours.values())),
                             layer_diff=_layer_diff(graph, counts, ours), seconds=time.time() - t))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500, help="test images per model (default 500)")
    ap.add_argument("-T", default="32,128")
    ap.add_argument("--models", default="mnist,digits,fashion")
    ap.add_argument("--readers", default="sinabs,snntorch,norse")
    ap.add_argument("--workdir", default=None, help="where the compiled models and NIR files go (default: temp)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    T_list = [int(t) for t in a.T.split(",")]
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="nir_readers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models.split(","):
        for reader in a.readers.split(","):
            for r in compare(model, reader, T_list, a.limit, workdir):
                rows.append(r)
                print(_line(r), flush=True)
    cmd = "python benchmarks/nir_readers.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    text = _table(rows, cmd)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text)
    return 0


def _line(r: dict) -> str:
    if r.get("agree") is None:
        return f"{r['model']:8s} {r['reader']:9s} T={r['T']:<4d} {r['config']}: FAILED {r['error']}"
    return (f"{r['model']:8s} {r['reader']:9s} T={r['T']:<4d} agree {100 * r['agree']:6.2f}%  rel.err "
            f"{r['rel_err']:.4f}  spikes {r['spikes']} (ann2snn {r['ann2snn_spikes']}, worst layer "
            f"{100 * r['layer_diff']:.2f}%)  ({r['config']}, {r['seconds']:.1f} s)")


def _table(rows: list[dict], cmd: str) -> str:
    out = [f"Command: `{cmd}`", "",
           ("| model | reader | configured | T | top-1 agreement with ann2snn | readout: mean abs diff / mean abs | "
            "spikes: reader / ann2snn | worst IF layer's spike count diff |"),
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("agree") is None:
            out.append(f"| {r['model']} | {r['reader']} | {r['config']} | {r['T']} | failed: {r['error']} | | | |")
        else:
            out.append(f"| {r['model']} | {r['reader']} | {r['config']} | {r['T']} | {100 * r['agree']:.2f}% "
                       f"({r['n']} images) | {r['rel_err']:.4f} | {r['spikes'] / max(r['ann2snn_spikes'], 1):.4f} | "
                       f"{100 * r['layer_diff']:.2f}% |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
