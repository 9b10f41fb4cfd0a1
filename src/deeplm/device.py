"""Device decisions in one place: which device, which autocast dtype, the device's peak FLOP/s,
synchronisation and memory reporting. CUDA -> MPS -> CPU by default, overridable."""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

# Dense bf16 tensor-core peaks from vendor datasheets (FLOP/s), matched on the device name.
_CUDA_PEAKS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
]


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to train on; 'auto' picks CUDA, then MPS, then CPU."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device = 'mps' but the MPS backend is not available")
    return torch.device(preference)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32.

    'auto' uses bf16 on CUDA (when supported) and MPS; on CPU it uses bf16 only where the CPU has
    native bf16 matrix instructions (AVX512-BF16 or AMX), where it measured 1.6x faster than fp32
    for the tiny preset (docs/performance.md), and fp32 elsewhere, where bf16 is emulated.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "mps":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    """True when this CPU has AVX512-BF16 or AMX tiles (bf16 matmuls in hardware)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            continue
    return False


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype)
    except RuntimeError as exc:  # e.g. an older MPS without bf16 autocast
        warnings.warn(
            f"bf16 autocast unavailable on {device.type} ({exc}); running fp32", stacklevel=2
        )
        return contextlib.nullcontext()


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Datasheet peak FLOP/s for MFU, when the device is known (CUDA bf16 only)."""
    if device.type != "cuda" or dtype is None:
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _CUDA_PEAKS:
        if key in name:
            return peak
    return None


_warned: set[str] = set()


def compile_supported(device: torch.device) -> bool:
    """Whether deeplm uses torch.compile on this device. On MPS it falls back to eager with one
    warning (Inductor's MPS backend is not yet dependable for training)."""
    if device.type == "mps":
        if "mps-compile" not in _warned:
            _warned.add("mps-compile")
            warnings.warn("torch.compile is not used on MPS; training runs eager", stacklevel=2)
        return False
    return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window where the backend keeps one (CUDA, MPS); the CPU figure
    is the process's peak resident set size, which cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        with contextlib.suppress(RuntimeError, NotImplementedError, AttributeError):
            torch.accelerator.reset_peak_memory_stats()


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory of this process's training on ``device``.

    CUDA: peak allocated since :func:`reset_peak_memory`. MPS: the same through
    ``torch.accelerator`` where this PyTorch supports it there, else the Metal driver's current
    allocation (``torch.mps.driver_allocated_memory``: a lower bound of the peak). CPU: the
    process's peak resident set size (None where the OS does not report it).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        try:
            return int(torch.accelerator.max_memory_allocated())
        except (RuntimeError, NotImplementedError, AttributeError):
            return int(torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        return peak_rss_bytes()
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (None on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def adamw_implementation(device: torch.device) -> dict[str, bool]:
    """Keyword arguments choosing AdamW's implementation on ``device``: the fused kernel on CUDA
    and MPS (one kernel for all parameters; PyTorch ships it for MPS since 2.4) where this PyTorch
    has it, the multi-tensor ``foreach`` path elsewhere (CPU: measured no slower, and the CPU
    results stay comparable with earlier runs)."""
    if device.type in ("cuda", "mps") and device.type in _fused_devices():
        return {"fused": True}
    return {"foreach": True}


def _fused_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # an older PyTorch: CUDA only
        return ["cuda"]


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
