"""Run on a machine with an NVIDIA GPU (not collected by pytest): meshllm's VRAM detection must
report NVML's total, the same number nvidia-smi shows.

    python3 tests/gpu_check.py
"""

from __future__ import annotations

import subprocess
import sys

from meshllm.models.capacity import GIB, detect_vram, nvml_total_bytes


def main() -> int:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    )
    smi_mib = sum(int(x) for x in smi.stdout.split())
    nvml = nvml_total_bytes()
    vram = detect_vram(None)
    print(
        f"nvidia-smi: {smi_mib} MiB; NVML: {nvml} bytes; detect_vram: {vram.bytes} bytes from {vram.source}"
    )
    ok = nvml is not None and vram.source == "nvml" and abs(nvml // (1024 * 1024) - smi_mib) <= 1
    ok = ok and detect_vram(3.0).bytes == 3 * GIB
    print("GPU VRAM detection:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
