"""The ``--tensor-split`` of a split host's llama-server: one weight per device, in llama.cpp's order.

llama.cpp weighs the layers it offloads by one number per device of the *model's* device list, which is
not the order ``--list-devices`` prints. ``--list-devices`` walks the backend registry: the local
backends (``CUDA0``, ``CUDA1``, ...) first, then one RPC device per device of each ``--rpc`` server, in
``--rpc`` order, numbered ``RPC0``, ``RPC1``, ... across servers and described by their endpoint. When it
builds a model's device list (``src/llama.cpp``, default device selection), llama.cpp puts the RPC
devices first "to minimize network transfers", then the local GPUs (a GPU two backends both list once,
integrated GPUs only when there is no discrete one). The split vector follows that model order.

A node's share of the plan is spread over its devices by their free memory: the host's over its local
GPUs (NVML's figures where known), a worker's over the devices its rpc-server exposes (what the list says
about them). A CPU-only host has no local GPU and gives its share to its own rpc-server; then the vector
is the plan's fractions, one per ``--rpc`` endpoint, as before GPUs were considered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshllm.models.devices import GpuMemory, LlamaDevice, gpu_devices


def model_device_order(devices: Sequence[LlamaDevice]) -> list[LlamaDevice]:
    """The devices llama.cpp loads a model onto, in its order: RPC devices, then this machine's GPUs."""
    rpc = [d for d in devices if d.backend == "RPC"]
    return [*rpc, *gpu_devices(devices)]


def expected_devices(
    local_gpus: Sequence[GpuMemory], endpoints: Sequence[tuple[str, Sequence[int]]]
) -> tuple[LlamaDevice, ...]:
    """What ``llama-server --rpc ... --list-devices`` would print, built from what the node knows:
    its own GPUs (named as llama.cpp named them at start) and, per ``--rpc`` endpoint in order, the free
    bytes of each device that server exposes (a CPU rpc-server: one device). Memory is kept in bytes,
    not rounded to MiB as llama.cpp prints it."""
    out = [
        LlamaDevice(g.device or f"CUDA{i}", g.name, g.total_bytes, g.free_bytes)
        for i, g in enumerate(local_gpus)
    ]
    n = 0
    for endpoint, frees in endpoints:
        for free in frees:
            out.append(LlamaDevice(f"RPC{n}", endpoint, free, free))
            n += 1
    return tuple(out)


def _spread(share: float, frees: Sequence[int]) -> list[float]:
    """``share`` over devices in proportion to their free memory (evenly when none reports any)."""
    total = sum(frees)
    if total <= 0:
        return [share / len(frees)] * len(frees)
    return [share * (f / total) for f in frees]


def tensor_split(
    devices: Sequence[LlamaDevice],
    local_gpus: Sequence[GpuMemory],
    endpoint_shares: Mapping[str, float],
    local_share: float = 0.0,
) -> list[float]:
    """One weight per device of the model's device list (see :func:`model_device_order`).

    ``devices`` is the list as llama.cpp prints it for the host's ``--rpc`` set; ``endpoint_shares``
    maps each ``--rpc`` endpoint (``127.0.0.1:port``) to the plan's fraction for the node behind it;
    ``local_share`` is the host's fraction when its own GPUs hold it (0 when its own rpc-server does).
    Free memory of a local GPU is taken from ``local_gpus`` (matched by llama.cpp's device name) when
    known there. Raises ``ValueError`` for an endpoint with no device, or a share for a device that is
    missing (a host share without local GPUs).
    """
    order = model_device_order(devices)
    weights: dict[str, float] = {}
    for endpoint, share in endpoint_shares.items():
        mine = [d for d in order if d.backend == "RPC" and d.description == endpoint]
        if not mine:
            raise ValueError(f"no RPC device for {endpoint} in the device list")
        weights.update(zip((d.name for d in mine), _spread(share, [d.free_bytes for d in mine]), strict=True))
    gpus = [d for d in order if d.backend != "RPC"]
    if local_share and not gpus:
        raise ValueError("a share for this node's GPUs, but the device list has none")
    if gpus:
        known = {g.device: g.free_bytes for g in local_gpus if g.device}
        frees = [known.get(d.name, d.free_bytes) for d in gpus]
        weights.update(zip((d.name for d in gpus), _spread(local_share, frees), strict=True))
    return [weights.get(d.name, 0.0) for d in order]


def format_split(weights: Sequence[float]) -> str:
    """``--tensor-split`` text: ``0.6,0.4`` (six significant digits each, as before)."""
    return ",".join(f"{w:g}" for w in weights)
