"""Fuzz ann2snn with mutated models and calibration files (on demand, not in the test suite).

Every case runs load -> compile -> a 4-step simulation in a worker process under a time
bound. A case ends "ok", with a clean error (an Ann2SnnError: one message, no traceback),
or as a failure: any other exception, a crash of the process, or a timeout. Failing inputs
are saved under --save so that each can become a regression test.

Run:  .venv/bin/python benchmarks/fuzz.py --cases 2000 --seed 0 [--timeout 30] [--save build/fuzz]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from common import ROOT

SEEDS = [  # (model, calibration data)
    ("models/digits_cnn.onnx", "models/data/digits_calib.npz"),
    ("models/sklearn_mlp.onnx", "models/data/sklearn_calib.npz"),
    ("models/keras_cnn.onnx", "models/data/keras_calib.npz"),
]


# -- mutations ----------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Bit flips, byte overwrites, truncation, deletion, duplication or insertion."""
    buf = bytearray(data)
    kind = rng.choice(["flip", "overwrite", "truncate", "delete", "duplicate", "insert"])
    n = len(buf)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 16))):
            i = int(rng.integers(0, n))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "overwrite":
        i = int(rng.integers(0, n))
        buf[i:i + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    elif kind == "truncate":
        del buf[int(rng.integers(0, n)):]
    elif kind == "delete":
        i = int(rng.integers(0, n))
        del buf[i:i + int(rng.integers(1, 64))]
    elif kind == "duplicate":
        i = int(rng.integers(0, n))
        buf[i:i] = buf[i:i + int(rng.integers(1, 256))]
    else:
        i = int(rng.integers(0, n))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
    return f"bytes/{kind}", bytes(buf)


OPS = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "Sigmoid", "Softmax", "Reshape", "Loop",
       "LSTM", "Clip", "LeakyRelu", "Concat", "Transpose", "Identity", "BatchNormalization", "Foo"]


def mutate_structure(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[str, bytes]:
    """A protobuf-aware change: op types, edges, dims, attributes, initializers, opsets."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = rng.choice(["op_type", "rewire", "drop_node", "dim", "attribute", "drop_init", "dtype", "opset",
                       "dup_output", "domain"])
    nodes = list(g.node)
    node = nodes[int(rng.integers(0, len(nodes)))]
    if kind == "op_type":
        node.op_type = str(rng.choice(OPS))
    elif kind == "rewire" and node.input:
        names = [o for n in nodes for o in n.output] + [i.name for i in g.input] + ["missing"]
        node.input[int(rng.integers(0, len(node.input)))] = str(rng.choice(names))
    elif kind == "drop_node":
        g.node.remove(node)
    elif kind == "dim":
        vis = list(g.input) + list(g.output) + [i for i in g.value_info]
        vi = vis[int(rng.integers(0, len(vis)))]
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(0, len(dims)))].dim_value = int(rng.choice([0, 1, 3, 7, 10**6, 2**40]))
    elif kind == "attribute" and node.attribute:
        a = node.attribute[int(rng.integers(0, len(node.attribute)))]
        if a.ints:
            a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.choice([-5, 0, 1, 99, 2**31]))
        elif a.HasField("i"):
            a.i = int(rng.choice([-5, 0, 99, 2**31]))
        elif a.HasField("f"):
            a.f = float(rng.choice([-1.0, 0.0, 1e30, np.nan]))
    elif kind == "drop_init" and g.initializer:
        g.initializer.remove(g.initializer[int(rng.integers(0, len(g.initializer)))])
    elif kind == "dtype" and g.initializer:
        g.initializer[int(rng.integers(0, len(g.initializer)))].data_type = int(rng.integers(0, 17))
    elif kind == "opset":
        m.opset_import[0].version = int(rng.choice([1, 6, 9, 11, 18, 23, 24, 99]))
    elif kind == "dup_output" and len(nodes) > 1:
        nodes[0].output[0] = nodes[-1].output[0]
    else:
        node.domain = str(rng.choice(["com.evil", "ai.onnx.ml", "ann2snn", ""]))
    return f"model/{kind}", m.SerializeToString()


def mutate_calib(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[str, bytes]:
    """Wrong names, dtypes, shapes, NaN/Inf, empty sets, huge values, or a damaged zip."""
    a = {k: v.copy() for k, v in arrays.items()}
    key = next(iter(a))
    kind = rng.choice(["rename", "dtype", "shape", "nan", "inf", "empty", "huge", "zip", "one_sample"])
    if kind == "rename":
        a["wrong"] = a.pop(key)
    elif kind == "dtype":
        a[key] = a[key].astype(rng.choice([np.float64, np.int32, np.uint8, np.float16]))
    elif kind == "shape":
        a[key] = a[key].reshape(a[key].shape[0], -1) if a[key].ndim > 2 else a[key][..., None]
    elif kind in ("nan", "inf"):
        flat = a[key].reshape(-1)
        flat[int(rng.integers(0, flat.size))] = np.nan if kind == "nan" else np.inf
    elif kind == "empty":
        a[key] = a[key][:0]
    elif kind == "huge":
        a[key] = a[key] * np.float32(1e38)
    elif kind == "one_sample":
        a[key] = a[key][:1]
    buf = io.BytesIO()
    np.savez(buf, **a)
    data = buf.getvalue()
    if kind == "zip":
        data = data[: int(rng.integers(0, len(data)))]
    return f"calib/{kind}", data


# -- the worker ---------------------------------------------------------------------------
def _worker(conn, workdir: str) -> None:
    import logging

    logging.disable(logging.WARNING)
    import ann2snn
    from ann2snn.runtime import SpikingSession

    work = Path(workdir)
    while True:
        job = conn.recv()
        if job is None:
            return
        model_bytes, calib_bytes = job
        (work / "m.onnx").write_bytes(model_bytes)
        (work / "c.npz").write_bytes(calib_bytes)
        try:
            snn = ann2snn.compile(work / "m.onnx", work / "c.npz", iters=4, batch=16)
            session = SpikingSession(snn)
            with np.load(work / "c.npz") as z:
                x = {s.name: z[s.name][:4] for s in session.input_specs}
            session.run(x, 4)
            conn.send(("ok", ""))
        except ann2snn.Ann2SnnError as exc:
            conn.send(("clean", str(exc).splitlines()[0][:200]))
        except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            conn.send(("unclean", f"{type(exc).__name__}: {exc}"[:300] + "\n" + traceback.format_exc()[-1500:]))


class Worker:
    """A persistent worker process that is killed and replaced when a case times out."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._start()

    def _start(self) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_worker, args=(child, str(self.workdir)), daemon=True)
        self.proc.start()

    def run(self, job: tuple[bytes, bytes], timeout: float) -> tuple[str, str]:
        self.conn.send(job)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            self._start()
            return "timeout", f"no answer within {timeout:.0f} s"
        code = self.proc.exitcode
        self.proc.join()
        self._start()
        return "crash", f"worker died with exit code {code}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--save", type=Path, default=ROOT / "build" / "fuzz")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    seeds = []
    for m, c in SEEDS:
        with np.load(ROOT / c) as z:
            seeds.append((onnx.load(ROOT / m), (ROOT / m).read_bytes(), {k: z[k] for k in z.files},
                          (ROOT / c).read_bytes()))
    args.save.mkdir(parents=True, exist_ok=True)
    workdir = args.save / "work"
    workdir.mkdir(exist_ok=True)
    worker = Worker(workdir)
    counts: dict[str, Counter] = {}
    failures = []
    start = time.time()
    for i in range(args.cases):
        model, model_bytes, arrays, calib_bytes = seeds[int(rng.integers(0, len(seeds)))]
        target = rng.choice(["bytes", "structure", "calib"])
        if target == "bytes":
            kind, model_bytes = mutate_bytes(model_bytes, rng)
        elif target == "structure":
            kind, model_bytes = mutate_structure(model, rng)
        else:
            kind, calib_bytes = mutate_calib(arrays, rng)
        outcome, detail = worker.run((model_bytes, calib_bytes), args.timeout)
        counts.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("unclean", "crash", "timeout"):
            case = args.save / f"case_{i:05d}"
            case.mkdir(exist_ok=True)
            (case / "model.onnx").write_bytes(model_bytes)
            (case / "calib.npz").write_bytes(calib_bytes)
            (case / "outcome.txt").write_text(f"{kind}\n{outcome}\n{detail}\n")
            failures.append((i, kind, outcome, detail.splitlines()[0]))
    worker.conn.send(None)
    total = Counter()
    for c in counts.values():
        total.update(c)
    print(f"command: python benchmarks/fuzz.py --cases {args.cases} --seed {args.seed} --timeout {args.timeout:.0f}")
    print(f"{args.cases} cases in {time.time() - start:.0f} s\n")
    print("| mutation | cases | ran | clean error | unclean error | crash | timeout |")
    print("|---|---|---|---|---|---|---|")
    for kind in sorted(counts):
        c = counts[kind]
        print(f"| {kind} | {sum(c.values())} | {c['ok']} | {c['clean']} | {c['unclean']} | {c['crash']} | {c['timeout']} |")
    print(f"| **all** | {sum(total.values())} | {total['ok']} | {total['clean']} | {total['unclean']} | "
          f"{total['crash']} | {total['timeout']} |")
    for i, kind, outcome, detail in failures:
        print(f"case {i} ({kind}): {outcome}: {detail}", file=sys.stderr)


if __name__ == "__main__":
    main()
