"""Run on a machine with an NVIDIA GPU and a CUDA build installed (not collected by pytest; run by
``scripts/gpu-check.sh``, which builds it first):

    python3 tests/gpu_check.py [vram|mesh|all]

``vram``: meshllm's VRAM detection reports NVML's total, the number nvidia-smi shows. ``mesh``: a solo node
on SmolLM2, then a forced 2-node split on the same GPU(s); for each, the backend the node logs, the
llama-server command (``-ngl``, ``--tensor-split``), tokens/s over a fixed-length completion and the GPU
memory NVML shows in use. Nodes run in their own process groups and are killed by PID at the end, also
on failure. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai

from meshllm.models.capacity import GIB, detect_vram, nvml_total_bytes
from meshllm.models.devices import MIB, nvml_gpus
from tests.support import NodeProcess, ProcessFactory, model_status, wait_until

MODEL = "smollm2-135m"
TOKENS = 256
WAIT_S = 180.0


def check_vram() -> bool:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    smi_mib = sum(int(x) for x in smi.stdout.split())
    nvml = nvml_total_bytes()
    vram = detect_vram(None)
    print(
        f"nvidia-smi: {smi_mib} MiB; NVML: {nvml} bytes; detect_vram: {vram.bytes} bytes from {vram.source}"
    )
    ok = nvml is not None and vram.source == "nvml" and abs(nvml // MIB - smi_mib) <= 1
    ok = ok and detect_vram(3.0).bytes == 3 * GIB
    print("GPU VRAM detection:", "OK" if ok else "MISMATCH")
    return ok


def gpu_used_mib() -> str:
    return ", ".join(f"{g.name} {(g.total_bytes - g.free_bytes) // MIB} MiB used" for g in nvml_gpus())


def tokens_per_s(proc: NodeProcess) -> float:
    client = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=120)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=8)  # warm up
    start = time.monotonic()
    reply = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    elapsed = time.monotonic() - start
    n = reply.usage.completion_tokens if reply.usage else TOKENS
    return n / elapsed


def report(label: str, proc: NodeProcess) -> bool:
    backend = proc.wait_event("llama.backend", 30)
    cmd = str(proc.events("llama.starting", kind="llama-server")[-1]["cmd"])
    print(
        f"[{label}] backend={backend.get('backend')} variant={backend.get('variant')} devices={backend.get('devices')}"
    )
    print(f"[{label}] llama-server: {cmd}")
    rate = tokens_per_s(proc)
    print(f"[{label}] {rate:.1f} tokens/s ({TOKENS} tokens); GPU memory: {gpu_used_mib()}")
    ok = backend.get("backend") == "cuda" and "-ngl 999" in cmd
    print(f"[{label}]", "OK" if ok else "NOT ON THE GPU")
    return ok


def check_mesh() -> bool:
    print(f"[mesh] before: {gpu_used_mib()}")
    with tempfile.TemporaryDirectory(prefix="meshllm-gpu-check-") as tmp:
        procs = ProcessFactory(Path(tmp))
        try:
            solo = procs.start("solo", extra=f'[models]\nserve = ["{MODEL}"]\n')
            wait_until(
                lambda: model_status(solo.console_url, MODEL).get("state") == "solo", WAIT_S, what="solo"
            )
            ok = report("solo", solo)
            solo.stop()
            host = procs.start(
                "host",
                extra=f'[models]\nserve = ["{MODEL}"]\nforce_split = true\n',
                node_extra="vram_gb = 2.0",
            )
            worker = procs.start(
                "worker",
                join=(host.token,),
                extra=f'[models]\nserve = ["{MODEL}"]\n',
                node_extra="vram_gb = 1.0",
            )

            def split() -> bool:
                m = model_status(host.console_url, MODEL)
                return m.get("state") == "split" and m.get("workers") == [worker.node_id]

            wait_until(split, WAIT_S, what="the 2-node split")
            ok = report("split", host) and ok
            cmd = str(host.events("llama.starting", kind="llama-server")[-1]["cmd"])
            ok = ok and "--tensor-split" in cmd and " -ot " not in cmd
            print("[split] worker rpc-server:", worker.events("llama.starting", kind="rpc-server")[-1]["cmd"])
            return ok
        except Exception as exc:
            print(f"[mesh] FAILED: {exc}")
            for p in procs.procs:
                print(f"--- {p.log_path.name} ---\n{p.tail(15)}")
            return False
        finally:
            procs.close()


def main(what: str = "all") -> int:
    ok = True
    if what in ("vram", "all"):
        ok = check_vram() and ok
    if what in ("mesh", "all"):
        ok = check_mesh() and ok
    print("GPU check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
