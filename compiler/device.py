"""Where onnxruntime runs: the CPU, or one CUDA GPU through onnxruntime-gpu (``--device``).

``onnxruntime`` and ``onnxruntime-gpu`` are the same Python module; the CUDA execution
provider exists only in the latter (the extra ``ann2snn[gpu]``, see README "One GPU").
Asking for ``cuda`` where it cannot work is a :class:`DeviceError` that says which of the
two things is missing: the provider (the package), or a usable GPU behind it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # onnxruntime is imported where a session is made: not at the command line's start-up
    import onnxruntime as ort

#: the values of ``--device``
DEVICES = ("cpu", "cuda")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
#: what installs the CUDA execution provider (README "One GPU" says what else to do)
GPU_INSTALL = ("pip install 'ann2snn[gpu]', then pip uninstall -y onnxruntime and "
               "pip install --force-reinstall --no-deps onnxruntime-gpu (README 'One GPU')")

#: a provider list as onnxruntime takes it: names, or (name, options) pairs
Providers = list[Any]


class DeviceError(ConfigError):
    """``--device cuda`` cannot work here: onnxruntime-gpu is not installed, or it is and no
    usable GPU is visible. The message says which, and the remedy."""


def check_device(device: str) -> str:
    """``device`` if it is one of :data:`DEVICES`, else a ConfigError naming them."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r} (--device)")
    return device


def require_cuda_provider() -> None:
    """DeviceError unless onnxruntime offers the CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise DeviceError(f"--device cuda needs onnxruntime-gpu, but this onnxruntime {ort.__version__} has no "
                          f"{CUDA_EP} (it offers {', '.join(available)}): {GPU_INSTALL}; or use --device cpu")


def providers_for(device: str, providers: Sequence[Any] | None = None, cuda_graph: bool = False,
                  device_id: int = 0) -> Providers:
    """The onnxruntime provider list of ``device`` (``providers`` overrides it as given).
    ``cuda``: the CUDA provider, with the CPU one for the few nodes the CUDA provider lacks;
    ``cuda_graph`` adds onnxruntime's ``enable_cuda_graph`` option (every node must then be on
    the GPU)."""
    check_device(device)
    if providers is not None:
        chosen = list(providers)
    elif device == "cpu":
        return [CPU_EP]
    else:
        require_cuda_provider()
        chosen = [(CUDA_EP, {"device_id": str(device_id)}), CPU_EP]
    if not cuda_graph:
        return chosen
    first = chosen[0] if chosen else CPU_EP
    name, options = (first[0], dict(first[1])) if isinstance(first, (tuple, list)) else (first, {})
    if name != CUDA_EP:
        raise ConfigError("CUDA graphs run on a GPU only: --cuda-graph needs --device cuda")
    return [(name, {**options, "enable_cuda_graph": "1"}), *chosen[1:]]


def on_cuda(providers: Sequence[Any]) -> bool:
    """Whether ``providers`` puts the CUDA execution provider first."""
    first = providers[0] if providers else CPU_EP
    return (first[0] if isinstance(first, (tuple, list)) else first) == CUDA_EP


def open_session(model: bytes | str, options: ort.SessionOptions | None, providers: Sequence[Any],
                 what: str = "the model") -> ort.InferenceSession:
    """An InferenceSession on ``providers``. With the CUDA provider first, a session that cannot
    be created, or that onnxruntime quietly put on the CPU instead (it does so when the CUDA or
    cuDNN libraries fail to load, or no GPU is visible), is a DeviceError."""
    import onnxruntime as ort

    if not on_cuda(providers):
        return ort.InferenceSession(model, options, providers=list(providers))
    require_cuda_provider()
    try:
        sess = ort.InferenceSession(model, options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types; each one becomes one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"onnxruntime-gpu is installed but could not create a CUDA session for {what}: {first}; "
                          "check that a GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES) and that the CUDA and cuDNN "
                          "libraries this onnxruntime-gpu was built for are installed, or use --device cpu") from None
    if CUDA_EP not in sess.get_providers():
        raise DeviceError(f"onnxruntime-gpu is installed but could not use the GPU for {what} (no GPU visible, or the "
                          "CUDA / cuDNN libraries failed to load; onnxruntime fell back to the CPU): check nvidia-smi "
                          "and CUDA_VISIBLE_DEVICES, and install the CUDA and cuDNN libraries this onnxruntime-gpu was "
                          "built for, or use --device cpu")
    return sess


def ort_device(providers: Sequence[Any]) -> tuple[str, int]:
    """The (device type, id) OrtValues of a session on ``providers`` live on: ("cuda", id)
    with the CUDA provider first, else ("cpu", 0)."""
    if not on_cuda(providers):
        return "cpu", 0
    first = providers[0]
    options = first[1] if isinstance(first, (tuple, list)) and len(first) > 1 else {}
    return "cuda", int(options.get("device_id", 0))
