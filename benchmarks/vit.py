"""The ViT reference (models/fashion_vit*.onnx, issue 16): ann2snn's SNN against its ANN, and
SpikingJelly 2.0.0's transformer conversions on the same weights, same test images, same T.

ann2snn part (the project's venv): each ``--compile-options`` string is given to
``python -m ann2snn compile`` as it is (so flags that do not exist yet, such as a signed neuron
site for GELU, can be measured once they land), on each exported file (legacy and dynamo); the
table gives the neuron layers, compensated ops and the MAC shares the compile reports, the SNN's
top-1 accuracy and agreement with its ANN at each T, and the simulation time per T against T
ANN passes (onnxruntime, same images, same batch).

SpikingJelly part (``--spikingjelly PYTHON``: a Python with torch and spikingjelly 2.0.0; it runs
this script again with ``--sj-part``): the same state dict (models/fashion_vit.pt) as a torch
module whose attention is ``nn.MultiheadAttention`` (the form STATransformerRecipe converts; the
in-projection and out-projection weights are the ones of the ONNX model, the function is the
same), the normalisation done outside. Recipes: TransformerTDEquivalentRecipe (float-valued
temporal-difference operators), STATransformerRecipe ``equivalent`` (float) and
``spiking_encoder`` (calibrated spike encoders after LayerNorm, GELU and attention; converted
once per T, as its thresholds depend on T), and SpikeZIPTFQANNRecipe (made for a quantised
ANN; given the float one through ModuleConverter, which accepts it). Inputs are SpikingJelly's "first step real, then zeros" sequences
and the readout the sum over the T steps, as in its ViT and BERT examples. Times: simulation
per T against T passes of the torch ANN (same images, same batch, same threads).

Run: ``.venv/bin/python benchmarks/vit.py [--spikingjelly /work/torch-venv/bin/python]
[--compile-options "" --compile-options "--nonlinear compensate"] [-T 8,16,32,64] [--limit 300]``
(writes benchmarks/results/vit.md and vit.json). The SpikingJelly part alone:
``/work/torch-venv/bin/python benchmarks/vit.py --sj-part ... > sj.json``, then ``--sj-json sj.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import T_axis, mac_share_cell, pyplot, save_figure

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"legacy": ROOT / "models" / "fashion_vit.onnx", "dynamo": ROOT / "models" / "fashion_vit_dynamo.onnx"}
WEIGHTS = ROOT / "models" / "fashion_vit.pt"
CALIB = ROOT / "models" / "data" / "fashion_calib.npz"
TEST = ROOT / "models" / "data" / "fashion_test.npz"


def test_data(limit: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``limit`` Fashion-MNIST test images and labels from image ``offset`` on (the ViT was
    trained on test images 5,000-9,999: 0-4,999 are held out)."""
    with np.load(TEST) as z:
        return z["input"][offset:offset + limit], z["label"][offset:offset + limit]


# -- ann2snn --------------------------------------------------------------------------------------

def ann2snn_part(Ts: list[int], options: list[str], limit: int, batch: int, offset: int = 0,
                 exporters: list[str] | None = None) -> list[dict[str, Any]]:
    """Compile each exported file with each option string; accuracy, agreement and times per T."""
    import onnx
    import onnxruntime as ort

    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.reference import model_metadata

    x, labels = test_data(limit, offset)
    rows = []
    for exporter, path in MODELS.items():
        if exporters and exporter not in exporters:
            continue
        ann = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ann.run(None, {"input": x[:batch]})  # warm-up, not timed
        start = time.perf_counter()
        ann_out = np.concatenate([ann.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
        ann_s = time.perf_counter() - start
        ann_top = ann_out.argmax(1)
        for opts in options:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "snn.onnx"
                cmd = [sys.executable, "-m", "ann2snn", "compile", str(path), "--calib", str(CALIB), "-o", str(out),
                       *shlex.split(opts)]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                compile_s = time.perf_counter() - start
                row: dict[str, Any] = {"exporter": exporter, "options": opts, "ann_accuracy": float((ann_top == labels).mean()),
                                       "ann_s": ann_s, "compile_s": compile_s}
                if done.returncode != 0:
                    row["error"] = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                    rows.append(row)
                    continue
                snn = onnx.load(str(out))
            meta = model_metadata(snn)
            row["inspect"] = inspect_summary(path, opts)
            row.update(neuron_layers=len(meta["neurons"]), compensated=len(meta.get("compensated") or []),
                       macs=meta["macs"], log=[ln for ln in done.stderr.splitlines() if "wrote" in ln])
            session = SpikingSession(snn)
            session.run({"input": x[:batch]}, T=1)  # warm-up, not timed
            by_T = {}
            for T in Ts:
                start = time.perf_counter()
                y = np.concatenate([session.run({"input": x[i:i + batch]}, T=T)["logits"] for i in range(0, len(x), batch)])
                seconds = time.perf_counter() - start
                top = y.argmax(1)
                by_T[T] = {"accuracy": float((top == labels).mean()), "agreement": float((top == ann_top).mean()),
                           "relative_error": float(np.abs(y - ann_out).mean() / np.abs(ann_out).mean()),
                           "max_abs_error": float(np.abs(y - ann_out).max()),
                           "seconds": seconds, "ann_passes": seconds / ann_s}
            # the largest spike count one neuron emits in one step, by T (an untimed probed run)
            probed = SpikingSession(snn, probes=session.spike_tensors)
            most = np.zeros(max(Ts))

            def track(t: int, values: dict[str, np.ndarray]) -> None:
                most[t] = max([most[t]] + [float(np.abs(v).max()) for v in values.values()])

            for i in range(0, len(x), batch):
                probed.run_many({"input": x[i:i + batch]}, [max(Ts)], on_step=track)
            for T in Ts:
                by_T[T]["max_spikes_per_step"] = float(most[:T].max())
            row["by_T"] = by_T
            rows.append(row)
    return rows


def inspect_summary(path: Path, opts: str) -> dict[str, Any]:
    """``ann2snn inspect --json`` with the compile options inspect takes (``--nonlinear`` and the
    other graph options; the rest, e.g. calibration flags, are dropped): per role, the ops and the
    reasons given."""
    from collections import Counter

    args, words, i = [], shlex.split(opts), 0
    takes = {"--nonlinear", "--maxpool", "--spiking-until", "--input-shape", "--signed-sites"}
    while i < len(words):
        if words[i] in takes and i + 1 < len(words):
            args += words[i:i + 2]
            i += 2
            continue
        if words[i] in ("--keep-clip-cap", "--drop-clip-cap", "--respike", "--no-respike"):
            args.append(words[i])
        i += 1
    done = subprocess.run([sys.executable, "-m", "ann2snn", "inspect", str(path), "--json", *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    info = json.loads(done.stdout)
    roles: dict[str, Counter] = {}
    reasons: dict[str, Counter] = {}
    for r in info["nodes"]:
        if r["role"] == "folded":
            continue
        roles.setdefault(r["role"], Counter())[r["op"].split("::")[-1]] += 1
        reasons.setdefault(r["role"], Counter())[r["detail"].split("; ")[-1]] += 1
    return {"roles": {k: dict(v) for k, v in roles.items()}, "reasons": {k: dict(v) for k, v in reasons.items()},
            "neuron_layers": info["neuron_layers"], "inspect_args": args}


# -- SpikingJelly (run with --sj-part under a Python that has torch and spikingjelly) ----------------

def sj_part(Ts: list[int], limit: int, batch: int, calib_batches: int) -> dict[str, Any]:
    """SpikingJelly's transformer recipes on the same weights; see the module doc."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "models"))
    from build_fashion import FASHION_MEAN, FASHION_STD
    from build_vit import FashionViT
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import (Converter, SpikeZIPTFQANNRecipe, STATransformerRecipe,
                                                       TransformerTDEquivalentRecipe)
    from spikingjelly.activation_based.ann2snn.converter import ModuleConverter

    torch.set_num_threads(2)
    # the largest spike count one STA encoder neuron emits in one step (its spikes are
    # trunc(mem / θ) thresholds, unbounded): the spike magnitude ann2snn is compared at
    from spikingjelly.activation_based.ann2snn.recipes import sta_transformer
    encoder = sta_transformer._STASpikeEncoder
    most = {"count": 0.0}
    plain_step = encoder.single_step_functional_forward

    def counting_step(self: nn.Module, inputs: tuple, states: tuple, **kwargs: object) -> tuple:
        (spike,), new_states = plain_step(self, inputs, states, **kwargs)
        theta = sta_transformer._broadcast_channel_vector(self.v_threshold, inputs[0], self.channel_dim)
        theta = torch.clamp(theta, min=torch.finfo(theta.dtype).eps)
        most["count"] = max(most["count"], float(torch.round(spike.abs() / theta).max()))
        return (spike,), new_states

    encoder.single_step_functional_forward = counting_step

    class MHABlock(nn.Module):
        """build_vit.Block with its attention as nn.MultiheadAttention (same weights)."""

        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            dim, heads = block.attn.dim, block.attn.heads
            self.ln1, self.ln2, self.mlp = block.ln1, block.ln2, block.mlp
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            with torch.no_grad():
                self.attn.in_proj_weight.copy_(block.attn.qkv.weight)
                self.attn.in_proj_bias.copy_(block.attn.qkv.bias)
                self.attn.out_proj.weight.copy_(block.attn.proj.weight)
                self.attn.out_proj.bias.copy_(block.attn.proj.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            # unpacked as torchvision's ViT does: SpikingJelly recognises an MHA output by its
            # unused second element (an integer getitem alone is refused)
            attended, _ = self.attn(h, h, h, need_weights=False)
            x = x + attended
            return x + self.mlp(self.ln2(x))

    def mha_net() -> nn.Module:
        net = FashionViT()
        net.load_state_dict(torch.load(WEIGHTS))
        net.blocks = nn.Sequential(*[MHABlock(b) for b in net.blocks])
        return net.eval()

    x, labels = test_data(limit)
    xs = (torch.from_numpy(x) - FASHION_MEAN) / FASHION_STD
    with np.load(CALIB) as z:
        calib = [(torch.from_numpy(z["input"][i * 100:(i + 1) * 100]) - FASHION_MEAN) / FASHION_STD
                 for i in range(calib_batches)]
    plain = FashionViT()
    plain.load_state_dict(torch.load(WEIGHTS))
    plain.eval()
    with torch.no_grad():
        plain(xs[:batch])  # warm-up, not timed
        start = time.perf_counter()
        ann_out = torch.cat([plain(xs[i:i + batch]) for i in range(0, len(xs), batch)]).numpy()
        ann_s = time.perf_counter() - start
        mha_out = torch.cat([mha_net()(xs[i:i + batch]) for i in range(0, len(xs), batch)]).numpy()
    ann_top = ann_out.argmax(1)
    out: dict[str, Any] = {"ann_accuracy": float((ann_top == labels).mean()), "ann_s": ann_s,
                           "mha_max_abs_difference": float(np.abs(mha_out - ann_out).max()), "recipes": {}}

    def simulate(snn: nn.Module, T: int, single_step: bool) -> tuple[np.ndarray, float]:
        functional.set_step_mode(snn, "s" if single_step else "m")
        ys = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(xs), batch):
                functional.reset_net(snn)
                if single_step:  # SpikeZIP's example: the same input at every step, outputs summed
                    ys.append(sum(snn(xs[i:i + batch]) for _ in range(T)))
                    continue
                seq = torch.zeros((T, *xs[i:i + batch].shape))
                seq[0] = xs[i:i + batch]  # the STA / TD examples: first step real, then zeros
                ys.append(snn(seq).sum(0))
        return torch.cat(ys).numpy(), time.perf_counter() - start

    def plain_net() -> nn.Module:
        net = FashionViT()
        net.load_state_dict(torch.load(WEIGHTS))
        return net.eval()

    recipes = {  # name -> (converter class, recipe for T, the torch form of the weights it is given)
        "TD-equivalent (float TD operators)": (
            Converter, lambda T: TransformerTDEquivalentRecipe(time_steps=T), mha_net),
        "STA equivalent (float)": (Converter, lambda T: STATransformerRecipe(None, time_steps=T), mha_net),
        "STA spiking_encoder (threshold scale 0.5, mse)": (
            Converter, lambda T: STATransformerRecipe(calib, time_steps=T, mode="spiking_encoder", threshold_scale=0.5),
            mha_net),
        # SpikeZIP-TF is made for a quantised ANN (QANN with its quantizers); ModuleConverter
        # takes the float ViT without complaint (its timm-style qkv / proj attention, not the
        # nn.MultiheadAttention form, whose out_proj it replaces, breaking torch's MHA kernel),
        # so what it makes of it is measured as it is
        "SpikeZIP-TF (SpikeZIPTFQANNRecipe vit, float ANN given)": (
            ModuleConverter, lambda T: SpikeZIPTFQANNRecipe(time_steps=T, model_family="vit"), plain_net),
    }
    for name, (converter, make, form) in recipes.items():
        rec: dict[str, Any] = {"by_T": {}}
        for T in Ts:
            try:
                start = time.perf_counter()
                snn = converter(make(T)).convert(form())
                convert_s = time.perf_counter() - start
                most["count"] = 0.0
                y, seconds = simulate(snn, T, converter is ModuleConverter)
            except Exception as exc:  # recorded in the results, with its text
                rec["error"] = f"{type(exc).__name__}: {exc}"
                break
            top = y.argmax(1)
            rec["by_T"][T] = {"accuracy": float((top == labels).mean()), "agreement": float((top == ann_top).mean()),
                              "relative_error": float(np.abs(y - ann_out).mean() / np.abs(ann_out).mean()),
                              "max_abs_error": float(np.abs(y - ann_out).max()), "seconds": seconds,
                              "ann_passes": seconds / ann_s, "convert_s": convert_s,
                              **({"max_spikes_per_step": most["count"]} if most["count"] else {})}
        out["recipes"][name] = rec
    import spikingjelly
    out["versions"] = {"spikingjelly": getattr(spikingjelly, "__version__", "2.0.0"), "torch": torch.__version__}
    return out


# -- the report -----------------------------------------------------------------------------------

def plot(results: dict[str, Any], path: Path, exporter: str = "dynamo") -> bool:
    """Accuracy against T and the largest spike count per step against T, for ann2snn's rows of
    one exporter and SpikingJelly's recipes, from the results JSON; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (acc, most) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [(f"ann2snn {r['options'].replace('--nonlinear compensate --signed-sites output', 'compensate+output')}",
             r["by_T"]) for r in results["ann2snn"] if r["exporter"] == exporter and "by_T" in r]
    sj = results.get("spikingjelly") or {"recipes": {}}
    rows += [(f"SpikingJelly {name}", rec["by_T"]) for name, rec in sj["recipes"].items() if rec["by_T"]]
    Ts = sorted({int(T) for _, by_T in rows for T in by_T})
    for label, by_T in rows:
        points = sorted((int(T), c) for T, c in by_T.items())
        style = "-o" if label.startswith("ann2snn") else "--s"
        acc.plot([T for T, _ in points], [100 * c["accuracy"] for _, c in points], style, label=label, markersize=3)
        if all("max_spikes_per_step" in c for _, c in points):
            most.plot([T for T, _ in points], [c["max_spikes_per_step"] for _, c in points], style, label=label,
                      markersize=3)
    ann = next((100 * r["ann_accuracy"] for r in results["ann2snn"] if "ann_accuracy" in r), None)
    if ann is not None:
        acc.axhline(ann, color="k", lw=0.8, label=f"ANN {ann:.2f}%")
    lo = min(100 * c["accuracy"] for label, by_T in rows if "STA" in label or label.startswith("ann2snn")
             for c in by_T.values())
    acc.set_ylim(max(0.0, lo - 1.0), (ann or lo) + 1.0)
    T_axis(acc, Ts, "ViT: top-1 accuracy", "accuracy (%)")
    most.set_yscale("log")
    T_axis(most, Ts, "largest spike count of one neuron in one step", "spikes per step")
    save_figure(fig, path)
    return True


def cell(c: dict[str, Any], T: int) -> str:
    """accuracy (agreement) [time ÷ T ANN passes] ⟨largest spike count of a neuron in one step⟩."""
    most = f" ⟨{c['max_spikes_per_step']:.0f}⟩" if "max_spikes_per_step" in c else ""
    return f"{100 * c['accuracy']:.2f} ({100 * c['agreement']:.1f}) [{c['ann_passes'] / T:.2f}×]{most}"


def render(ours: list[dict[str, Any]], sj: dict[str, Any] | None, Ts: list[int], limit: int, command: str,
           note: str = "", offset: int = 0) -> str:
    """benchmarks/results/vit.md."""
    head = "| " + " | ".join(["converter / options", "file", "neuron layers", "compensated ops",
                              "MACs spiking / prefix / tail / comp. (%)", "ANN", *(f"T={T}" for T in Ts),
                              "max error"]) + " |"
    lines = [f"`{command}`{note}", "", f"Fashion-MNIST test images {offset}..{offset + limit - 1}. Cells: top-1 accuracy % "
             "(agreement with the ANN %) [simulation time ÷ the time of T ANN passes in the same runtime, same "
             "images and batch] ⟨the largest spike count one neuron emitted in one step, up to T: ann2snn's "
             "neurons, SpikingJelly STA's spike encoders⟩; last column: largest |SNN − ANN| logit at "
             f"T = {Ts[-1]}.", "", head,
             "|" + "---|" * (7 + len(Ts))]
    for r in ours:
        if "error" in r:
            lines.append(f"| ann2snn `{r['options'] or '(defaults)'}` | {r['exporter']} | compile failed: {r['error']} |")
            continue
        m = r["macs"]
        tot = max(m.get("total", 0), 1)
        share = mac_share_cell({k: 100 * v / tot for k, v in m.items()}, ("spiking", "prefix", "tail", "compensated"))
        cells = [cell(c, T) for T, c in ((T, r["by_T"][T]) for T in Ts)]
        lines.append(f"| ann2snn `{r['options'] or '(defaults)'}` | {r['exporter']} | {r['neuron_layers']} | "
                     f"{r['compensated']} | {share} | {100 * r['ann_accuracy']:.2f} | " + " | ".join(cells)
                     + f" | {r['by_T'][Ts[-1]]['max_abs_error']:.1e} |")
    lines += ["", "What `ann2snn inspect` says (per role: op counts, and the reasons it gives; folded constants left out):", ""]
    for r in ours:
        info = r.get("inspect")
        if not info:
            continue
        if "error" in info:
            lines.append(f"- {r['exporter']}, `{r['options'] or '(defaults)'}`: inspect failed: {info['error']}")
            continue
        parts = []
        for role, ops in info["roles"].items():
            listed = ", ".join(f"{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
            why = "; ".join(f"“{reason}” ×{n}" for reason, n in info["reasons"][role].items())
            parts.append(f"**{role}**: {listed} ({why})")
        lines.append(f"- {r['exporter']}, `{r['options'] or '(defaults)'}` → inspect `{' '.join(info['inspect_args']) or '(defaults)'}`: "
                     f"{info['neuron_layers']} neuron layer(s); " + "; ".join(parts))
    if sj is not None:
        lines += ["", "SpikingJelly 2.0.0 on the same weights and images (see the notes below the table in "
                  "README / this file's header):", "", head, "|" + "---|" * (7 + len(Ts))]
        for name, rec in sj["recipes"].items():
            if not rec["by_T"]:
                lines.append(f"| SpikingJelly {name} | torch | - | - | - | {100 * sj['ann_accuracy']:.2f} | "
                             f"did not run: `{rec.get('error', '')[:400]}` |")
                continue
            cells = []
            for T in Ts:
                c = rec["by_T"].get(T)
                cells.append("-" if c is None else cell(c, T))
            last = rec["by_T"].get(Ts[-1])
            lines.append(f"| SpikingJelly {name} | torch | - | - | - | {100 * sj['ann_accuracy']:.2f} | "
                         + " | ".join(cells) + f" | {'-' if last is None or 'max_abs_error' not in last else format(last['max_abs_error'], '.1e')} |")
            if "error" in rec:
                lines.append(f"| (stopped) | | | | | | `{rec['error'][:400]}` |")
        lines += ["", f"SpikingJelly versions: {sj['versions']}; the nn.MultiheadAttention form of the same weights "
                  f"differs from the ONNX model's function by at most {sj['mha_max_abs_difference']:.1e} in the logits; "
                  f"torch ANN: {100 * sj['ann_accuracy']:.2f}% on these images.", "", SJ_NOTES]
    return "\n".join(lines) + "\n"


#: what SpikingJelly 2.0.0's transformer recipes need and do (read in its source, and seen when
#: the script was written); printed under its table
SJ_NOTES = """Notes on SpikingJelly 2.0.0's transformer conversion (its source in
`spikingjelly/activation_based/ann2snn/recipes/`):

- Inputs: its ViT / BERT examples feed the input at the first step and zeros after it, and sum
  the outputs over T; SpikeZIP's example feeds the same input at every step (single-step mode).
  This script does the same.
- `STATransformerRecipe` converts `nn.MultiheadAttention`, not attention written as
  `q @ k.transpose(-2, -1)`: on build_vit's own module it stops with `ValueError:
  STATransformerRecipe step-mode backend does not support function node <built-in function
  matmul>.` Its FX step-mode adapters also refuse a `permute` that moves the batch axis
  (`requires permute to preserve the original batch dimension`), dynamic slice bounds and an
  integer getitem of a tensor (`MultiheadAttention(...)[0]`; `out, _ = mha(...)` is accepted),
  so build_vit writes its attention without them and the script gives STA the same weights as
  `nn.MultiheadAttention`. `equivalent` mode is float-valued throughout (no spikes: exact, as
  the table shows); `spiking_encoder` puts calibrated spike encoders after LayerNorm, GELU and
  attention while the Linear / Conv layers stay float-valued, and is converted (calibrated)
  again for each T.
- `TransformerTDEquivalentRecipe` (float temporal-difference operators) is wrong on this model
  because it adds the learned position embedding (an `nn.Parameter` read by an FX `get_attr`)
  at every step while the image comes only at the first: with the embedding set to zero its
  summed output equals the ANN exactly (max |difference| 0.0 on 20 images at T = 8), with it
  the error grows with T (6.6 at T = 8). STA unrolls such constants to the first step.
- `SpikeZIPTFQANNRecipe` (through `ModuleConverter`; `Converter` refuses it with `TypeError:
  FXConverter/Converter requires an FXConversionRecipe`) is made for a quantised ANN whose
  attention carries SpikeZIP's quantizers (`quan_q`, `quan_k`, `attn_quan`, ...); a float ViT
  has none, so it replaces the Linear / Conv / LayerNorm layers by its ST-BIF modules and leaves
  GELU, Softmax and the attention products as they are: the row measures what it makes of
  these float weights, not SpikeZIP-TF on a QANN trained for it (which would need training).
  Given the `nn.MultiheadAttention` form instead, it replaces `out_proj` and torch's attention
  kernel fails: `TypeError: _native_multi_head_attention(): argument 'proj_bias' (position 9)
  must be Tensor, not NoneType`.
"""


def main() -> None:
    """Parse the options, run the parts, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-T", default="8,16,32,64")
    ap.add_argument("--compile-options", action="append", default=None,
                    help='options for `ann2snn compile`, one string per configuration (repeatable); default: "" and '
                         '"--nonlinear compensate"')
    ap.add_argument("--limit", type=int, default=300, help="test images (the first N)")
    ap.add_argument("--offset", type=int, default=0, help="start at this test image (ann2snn part only)")
    ap.add_argument("--exporters", default="", help="only these of legacy,dynamo (default: both)")
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--calib-batches", type=int, default=2, help="SpikingJelly STA calibration batches of 100")
    ap.add_argument("--spikingjelly", default=None, help="a Python with torch and spikingjelly 2.0.0")
    ap.add_argument("--sj-json", type=Path, default=None,
                    help="the saved output of a `--sj-part` run (same -T and --limit) instead of running it again")
    ap.add_argument("--sj-part", action="store_true", help="run only the SpikingJelly part and print its JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vit.md")
    ap.add_argument("--replot", type=Path, default=None,
                    help="only draw the PNG of an earlier run's JSON (beside it; needs matplotlib, not ann2snn)")
    args = ap.parse_args()
    if args.replot:
        if not plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png")):
            raise SystemExit("--replot needs matplotlib (pip install matplotlib)")
        return
    Ts = [int(t) for t in args.T.split(",")]
    if args.sj_part:
        print(json.dumps(sj_part(Ts, args.limit, args.batch, args.calib_batches)))
        return
    logging.basicConfig(level=logging.ERROR)
    options = args.compile_options if args.compile_options is not None else ["", "--nonlinear compensate"]
    if args.offset and (args.spikingjelly or args.sj_json):
        raise SystemExit("--offset is for the ann2snn part only (e.g. choosing a recipe on other images)")
    ours = ann2snn_part(Ts, options, args.limit, args.batch, args.offset,
                        args.exporters.split(",") if args.exporters else None)
    sj = None
    if args.sj_json:
        sj = json.loads(args.sj_json.read_text().strip().splitlines()[-1])
    elif args.spikingjelly:
        done = subprocess.run([args.spikingjelly, __file__, "--sj-part", "-T", args.T, "--limit", str(args.limit),
                               "--batch", str(args.batch), "--calib-batches", str(args.calib_batches)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the SpikingJelly part failed:\n{done.stderr[-3000:]}")
        sj = json.loads(done.stdout.strip().splitlines()[-1])
    if sj is not None:  # JSON object keys are strings
        for rec in sj["recipes"].values():
            rec["by_T"] = {int(T): c for T, c in rec["by_T"].items()}
    command = "python benchmarks/vit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    note = f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end)"
    if args.sj_json:
        note += (f"; the SpikingJelly part from `python benchmarks/vit.py --sj-part -T {args.T} --limit {args.limit} "
                 f"--batch {args.batch} --calib-batches {args.calib_batches}` under its own Python")
    text = render(ours, sj, Ts, args.limit, command, note, args.offset)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"ann2snn": ours, "spikingjelly": sj}, indent=1) + "\n")
    args.out.write_text(text)
    if plot({"ann2snn": ours, "spikingjelly": sj}, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")
    print(text)


if __name__ == "__main__":
    main()
