"""The GPU's clocks, temperature, power and clock-limit reasons, read through NVML.

Decode kernels bound by instruction issue run at the SM clock, which the card lowers when it hits
its power cap or heats up (after a long prefill, say). A benchmark that records this state around
each timed run can tell such a spread between runs from one caused by the code. NVML comes with
``nvidia-ml-py`` (``import pynvml``; preinstalled on the device machines); where it or the driver's
library is missing, ``gpu_state`` returns None and the benchmark runs as before.
"""

from __future__ import annotations

import functools

# NVML's clock event reasons (nvmlClocksEventReason*), by the names a report prints.
_REASONS = {
    "idle": 0x1,
    "app_clocks": 0x2,
    "power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "power_brake": 0x80,
}


@functools.cache
def _handle(uuid: str):
    """The NVML handle of the device with this UUID (``GPU-...``), or None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except pynvml.NVMLError:  # no driver library, no such device
        return None


def reason_names(mask: int) -> list[str]:
    """The names of the clock-limit reasons set in NVML's bit ``mask``; unknown bits as hex."""
    names = [name for name, bit in _REASONS.items() if mask & bit]
    rest = mask & ~sum(_REASONS.values())
    return names + ([hex(rest)] if rest else [])


def gpu_state(device=None) -> dict | None:
    """``{"sm_mhz", "mem_mhz", "temp_c", "power_w", "limits"}`` of a CUDA device (default: the current
    one) now, or None where NVML cannot be read. ``limits``: the reasons the clocks are below their
    maximum (``reason_names``), e.g. ``["power_cap"]``."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    handle = _handle(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    if handle is None:
        return None
    import pynvml

    # The older name of the same query, for nvidia-ml-py before 12.535.
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    reasons = reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    try:
        return {
            "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "limits": reason_names(reasons(handle)),
        }
    except pynvml.NVMLError:  # a query this card or driver does not answer
        return None


def describe(state: dict | None) -> str:
    """One short line for a report: ``"1980 MHz, 52 C, 610 W"`` plus any clock limits."""
    if state is None:
        return "no NVML"
    limits = f" [{', '.join(state['limits'])}]" if state["limits"] else ""
    return f"{state['sm_mhz']} MHz, {state['temp_c']} C, {state['power_w']:.0f} W{limits}"
