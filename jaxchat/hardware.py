"""What a device can do: nominal bf16 peak FLOP/s and HBM bandwidth by accelerator name, and MFU against them.

It imports nothing, so the GPU check (bench/gpu_check.py) reads these figures on an image that lacks some of jaxchat's
dependencies, and the trainer, the dry run and the benches share one table.
"""
from __future__ import annotations

# bf16 dense peak FLOP/s by accelerator name (substring of `device.device_kind`); longest match wins.
PEAK_FLOPS = {
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2.25e15,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165.2e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
# Nominal HBM bandwidth (bytes/s) by the same names, for decode's memory-bandwidth utilisation.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "GH200": 4.0e12, "A100": 2.0e12}


def _by_name(table: dict, device_kind: str) -> float | None:
    matches = [k for k in table if k.lower() in device_kind.lower()]
    return table[max(matches, key=len)] if matches else None


def peak_flops(device_kind: str) -> float | None:
    """bf16 peak of a device by name, or None when unknown (then MFU is not reported)."""
    return _by_name(PEAK_FLOPS, device_kind)


def peak_bandwidth(device_kind: str) -> float | None:
    """Nominal HBM bytes/s of a device by name, or None when unknown."""
    return _by_name(PEAK_BANDWIDTH, device_kind)


def mfu(flops_per_token: float, tokens_per_s: float, device_kind: str, n_devices: int,
        peak: float = 0.0) -> float | None:
    """Model FLOPs utilisation in percent of the devices' bf16 peak; None for an unknown device (no guess)."""
    peak = peak or peak_flops(device_kind)
    if not peak:
        return None
    return 100.0 * flops_per_token * tokens_per_s / (peak * n_devices)
