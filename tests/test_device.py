"""Device decisions (deeplm.device), including the Apple Silicon (MPS) branches, checked
through the module's functions. This machine has no GPU: the MPS/CUDA branches are reached by
making PyTorch report such a device; what the real hardware does is recorded in
docs/performance.md."""

from __future__ import annotations

import warnings

import pytest
import torch

from deeplm import device as dev

MPS, CUDA, CPU = torch.device("mps"), torch.device("cuda", 0), torch.device("cpu")


def test_explicit_devices_and_clear_errors(monkeypatch):
    assert dev.select_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.device = 'cuda'"):
        dev.select_device("cuda")
    with pytest.raises(RuntimeError, match="train.device = 'mps'.*not available"):
        dev.select_device("mps")
    assert dev.select_device("auto") == CPU


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.select_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.select_device("auto").type == "cuda"


def test_autocast_dtype_per_device(monkeypatch):
    assert dev.autocast_dtype(MPS, "auto") is torch.bfloat16  # bf16 autocast on MPS
    assert dev.autocast_dtype(MPS, "fp32") is None
    assert dev.autocast_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.autocast_dtype(CPU, "auto") is None  # emulated bf16 (e.g. Apple's CPU): fp32
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.autocast_dtype(CPU, "auto") is torch.bfloat16


def test_autocast_falls_back_to_fp32_with_a_warning(monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("bf16 not supported on this macOS")

    monkeypatch.setattr(torch, "autocast", refuse)
    with pytest.warns(UserWarning, match="bf16 autocast unavailable on mps"):
        ctx = dev.autocast_context(MPS, torch.bfloat16)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")


def test_compile_is_skipped_on_mps_with_one_warning(monkeypatch):
    monkeypatch.setattr(dev, "_warned", set())
    with pytest.warns(UserWarning, match="torch.compile is not used on MPS"):
        assert dev.compile_supported(MPS) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.compile_supported(MPS) is False  # once only
    assert dev.compile_supported(CPU) and dev.compile_supported(CUDA)


def test_peak_memory_on_cpu_and_mps(monkeypatch):
    assert dev.peak_memory_bytes(CPU) > 10 * 2**20  # this process's peak RSS
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda *a: 5 * 2**30)
    assert dev.peak_memory_bytes(MPS) == 5 * 2**30

    def unsupported(*a):
        raise RuntimeError("not implemented for mps")

    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", unsupported)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * 2**30)
    assert dev.peak_memory_bytes(MPS) == 3 * 2**30
    calls = []
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats", lambda *a: calls.append(1))
    dev.reset_peak_memory(MPS)
    dev.reset_peak_memory(CPU)  # nothing to reset
    assert calls == [1]


def test_synchronize_reaches_the_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    dev.synchronize(MPS)
    dev.synchronize(CPU)
    assert calls == ["mps"]


def test_optimizer_kernel_and_peak_flops(monkeypatch):
    assert dev.adamw_implementation(CPU) == {"foreach": True}
    assert dev.adamw_implementation(MPS) == {"fused": True}
    assert dev.adamw_implementation(CUDA) == {"fused": True}
    monkeypatch.setattr(dev, "_fused_devices", lambda: ["cuda"])  # an older PyTorch
    assert dev.adamw_implementation(MPS) == {"foreach": True}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert dev.peak_flops(CUDA, torch.bfloat16) == 989e12
    assert dev.peak_flops(CUDA, None) is None and dev.peak_flops(MPS, torch.bfloat16) is None
