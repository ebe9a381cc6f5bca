"""The GPUs the benchmarks know, by device name: memory bandwidth (a key scan's floor) and a short
name for result files. No torch import: scripts/gpu_check_summary.py runs after every stage."""

from __future__ import annotations

# Memory bandwidth by card (datasheets), the floor of a scan that reads every key once; the
# first name that occurs in torch.cuda.get_device_name() wins.
CARD_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))


def card_bytes_per_s(device_name: str | None) -> float | None:
    """The memory bandwidth of the card named ``device_name`` (None: not a card we know)."""
    for key, value in CARD_BYTES_PER_S:
        if device_name and key in device_name:
            return value
    return None


def card_slug(device_name: str | None) -> str:
    """'h200', 'h100', ... for file names ('cpu' without a device name)."""
    if not device_name:
        return "cpu"
    for key, _ in CARD_BYTES_PER_S:
        if key in device_name:
            return key.split()[0].lower()
    return "".join(c for c in device_name.lower().replace("nvidia", "") if c.isalnum()) or "gpu"
