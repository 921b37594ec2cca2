"""The terminal picture of ``/api/status`` (meshllm.console.terminal): what it shows for a realistic
mesh, and that odd, partial or huge status JSON renders within the width without an exception."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.console.terminal import render

G = 1024**3
ALPHA = "40ec44b5f3a64a3e142fb3cb70ee89b0"
BETA = "831a25ff738e78c0c5046d7bdeb71a96"
GAMMA = "aaaa25ff738e78c0c5046d7bdeb71a96"
DELTA = "dddd25ff738e78c0c5046d7bdeb71a96"


def peer(node_id: str, name: str, vram: float, serving: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "name": name,
        "role": "active",
        "vram_bytes": vram,
        "models": list(serving),
        "serving": list(serving),
        "last_seen_s": 0.1,
        "addrs": [],
    }


def model(name: str, state: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "state": state,
        "hosts": [],
        "host": "",
        "workers": [],
        "fractions": [],
        "size_bytes": 0,
        "needed_bytes": 0,
        "available_bytes": 0,
        "detail": "",
        "demand_per_min": 0.0,
        "download": None,
    }
    return {**base, **fields}


STATUS: dict[str, Any] = {
    "node_id": ALPHA,
    "name": "alpha",
    "role": "active",
    "vram_bytes": 24 * G,
    "mesh_id": "59b0d66515d9fed7",
    "peers": [
        peer(BETA, "beta", 12 * G),
        peer(GAMMA, "gamma", 8 * G, serving=("small",)),
        peer(DELTA, "delta", 16 * G),
    ],
    "dead": [],
    "models": [
        model(
            "big",
            "split",
            hosts=[ALPHA],
            host=ALPHA,
            workers=[BETA],
            fractions=[0.67, 0.33],
            size_bytes=30 * G,
            demand_per_min=12.5,
        ),
        model("small", "serving", hosts=[GAMMA], size_bytes=2 * G, demand_per_min=3.0),
        model(
            "huge",
            "waiting",
            size_bytes=70 * G,
            needed_bytes=77 * G,
            available_bytes=44 * G,
            detail="no node and no group has 77.0 GiB",
        ),
        model(
            "hubm",
            "waiting",
            download={
                "model": "hubm",
                "ref": "org/repo:Q4_K_M",
                "state": "downloading",
                "done_bytes": 1 * G,
                "total_bytes": 4 * G,
                "rate_bytes_s": 35 * 1024**2,
            },
        ),
        model(
            "toobig",
            "failed",
            download={
                "model": "toobig",
                "ref": "org/x:Q8_0",
                "state": "refused",
                "needed_bytes": 400 * G,
                "available_bytes": 44 * G,
                "reason": "larger than this node and its split peers",
            },
        ),
    ],
    "gpus": [{"index": 0, "uuid": "GPU-1", "name": "RTX 4090", "total_bytes": 24 * G, "free_bytes": 12 * G}],
    "passive_connections": 5,
    "standby_connections": 2,
}


def block(text: str, start: str) -> list[str]:
    """The lines of one node or model: its first line (starting with ``start`` after the indent)
    and the more indented ones after it."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("  " + start))
    out = [lines[i]]
    for line in lines[i + 1 :]:
        if not line.startswith("    "):
            break
        out.append(line)
    return out


def test_nodes_have_names_short_ids_roles_and_usage_bars() -> None:
    text = render(STATUS, 100)
    alpha, beta, gamma, delta = (block(text, n) for n in ("alpha", "beta", "gamma", "delta"))
    assert alpha[0].split()[:3] == ["alpha", ALPHA[:8], "host"] and "this node" in alpha[0]
    assert "worker" in beta[0] and "serving" in gamma[0] and "idle" in delta[0]
    # alpha holds 67 % of 30 GiB in 24 GiB: 84 %, over the warning line; beta 33 % of 30 GiB in 12 GiB.
    assert "84%!" in alpha[2] and "20.1 GiB" in alpha[2]
    assert "82%!" in beta[2] and "9.9 GiB" in beta[2]
    assert " 25% " in gamma[2] and "!" not in gamma[2]  # 2 GiB of 8 GiB
    assert "  0% " in delta[2]
    # The capacity bar is relative to the largest node: alpha's is full, gamma's a third.
    assert abs(alpha[1].count("#") - 3 * gamma[1].count("#")) <= 1
    assert "24.0 GiB" in alpha[1] and "8.0 GiB" in gamma[1]


def test_gpu_lines_show_what_is_taken_of_each_gpu() -> None:
    alpha = block(render(STATUS, 100), "alpha")
    gpu = next(line for line in alpha if "gpu 0" in line)
    assert "RTX 4090" in gpu and " 50% " in gpu and "12.0 GiB / 24.0 GiB" in gpu
    assert not any("gpu" in line for line in block(render(STATUS, 100), "beta"))


def test_models_show_state_split_shortfall_download_refusal_and_demand() -> None:
    text = render(STATUS, 100)
    big = block(text, "big")
    assert "split" in big[0] and "30.0 GiB" in big[0] and "12.5 req/min" in big[0]
    assert any("alpha (host 67%) + beta (worker 33%)" in line for line in big)
    small = block(text, "small")
    assert "3.0 req/min" in small[0] and any("served by: gamma" in line for line in small)
    huge = "\n".join(block(text, "huge"))
    assert "waiting" in huge and "short by 33.0 GiB" in huge and "no node and no group" in huge
    hubm = "\n".join(block(text, "hubm"))
    assert "downloading" in hubm and " 25% " in hubm and "1.0 GiB / 4.0 GiB" in hubm and "35.0 MiB/s" in hubm
    assert "short by" not in hubm
    toobig = " ".join(line.strip() for line in block(text, "toobig"))
    assert "refused" in toobig and "larger than this node and its split peers" in toobig


def test_passive_counts_split_clients_from_standbys() -> None:
    text = render(STATUS, 100)
    assert "clients 3, standbys 2" in text
    own = {
        **STATUS,
        "standby": {"offers": ["big"], "capacity_bytes": 8 * G, "pending": "", "promoted_for": ""},
    }
    assert "stands by with 8.0 GiB for: big" in render(own, 100)


def test_a_model_without_size_counts_as_unknown_not_zero() -> None:
    status = copy.deepcopy(STATUS)
    status["models"][1]["size_bytes"] = 0  # known only through a peer
    del status["models"][0]["size_bytes"]
    text = render(status, 100)
    assert block(text, "gamma")[2].endswith("+?")
    assert block(text, "beta")[2].endswith("+?")
    assert "  small  serving  ?" in text


def test_a_model_known_only_through_peers_takes_the_size_they_announce() -> None:
    status = copy.deepcopy(STATUS)
    status["models"][1]["size_bytes"] = 0
    status["peers"][1]["model_bytes"] = {"small": 2 * G}
    text = render(status, 100)
    assert "  small  serving  2.0 GiB" in text
    assert not block(text, "gamma")[2].endswith("+?") and "2.0 GiB" in block(text, "gamma")[2]


def test_a_peers_gpus_show_under_it() -> None:
    status = copy.deepcopy(STATUS)
    status["peers"][0]["gpus"] = [{"name": "NVIDIA L4", "total_bytes": 24 * G, "free_bytes": 18 * G}]
    beta = block(render(status, 100), "beta")
    gpu = next(line for line in beta if "gpu" in line)
    assert "L4" in gpu and "6.0 GiB / 24.0 GiB" in gpu


def test_split_fractions_that_do_not_match_the_members_are_shared_equally() -> None:
    status = copy.deepcopy(STATUS)
    status["models"][0]["fractions"] = [1.0]
    assert "alpha (host 50%) + beta (worker 50%)" in render(status, 100)


def test_every_line_fits_the_width() -> None:
    for width in (40, 60, 80, 100, 160):
        text = render(STATUS, width)
        assert max(len(line) for line in text.splitlines()) <= width, width
        assert "big" in text and "alpha" in text


def test_hundreds_of_nodes_all_show() -> None:
    peers = [peer(f"{i:032x}", f"node-{i}", (i % 7 + 1) * G, serving=("small",)) for i in range(1, 401)]
    status = {**STATUS, "peers": peers}
    text = render(status, 80)
    assert "401 nodes" in text and "NODES (401)" in text
    assert all(f"node-{i} " in text for i in range(1, 401))


def test_empty_and_error_bodies_render() -> None:
    assert "MODELS (0)" in render({}, 80)
    assert "?" in render({"error": "status unavailable"}, 80)
    text = render(
        {"name": "x\x1b[2Jy\nz", "vram_bytes": float("nan"), "peers": "no", "models": [1, None]}, 80
    )
    assert "\x1b" not in text and "x [2Jy z" in text


json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4))


json_value = st.recursive(json_leaf, json_containers, max_leaves=12)
FIELDS = [
    "node_id", "name", "role", "vram_bytes", "peers", "models", "gpus", "dead", "mesh_id",
    "passive_connections", "standby_connections", "standby", "hosts", "host", "workers", "fractions",
    "size_bytes", "needed_bytes", "available_bytes", "detail", "demand_per_min", "download", "state",
    "done_bytes", "total_bytes", "rate_bytes_s", "reason", "serving", "index", "total_bytes", "free_bytes",
    "offers", "capacity_bytes", "pending",
]  # fmt: skip


def mutated(status: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``status`` with some known fields, at any depth, replaced by arbitrary JSON or removed."""

    def apply(edits: list[tuple[int, str, Any, bool]]) -> dict[str, Any]:
        out = copy.deepcopy(status)
        holders: list[dict[str, Any]] = []

        def collect(v: Any) -> None:
            if isinstance(v, dict):
                holders.append(v)
                for x in v.values():
                    collect(x)
            elif isinstance(v, list):
                for x in v:
                    collect(x)

        collect(out)
        for which, key, value, remove in edits:
            holder = holders[which % len(holders)]
            if remove:
                holder.pop(key, None)
            else:
                holder[key] = value
        return out

    edit = st.tuples(st.integers(0, 100), st.sampled_from(FIELDS), json_value, st.booleans())
    return st.lists(edit, min_size=1, max_size=6).map(apply)


@settings(max_examples=300, deadline=None)
@given(status=mutated(STATUS), width=st.integers(0, 200))
def test_odd_fields_never_break_the_picture(status: dict[str, Any], width: int) -> None:
    text = render(status, width)
    assert text.endswith("\n")
    assert max(len(line) for line in text.splitlines()) <= max(width, 40)


@settings(max_examples=200, deadline=None)
@given(status=st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=8))
def test_arbitrary_json_objects_render(status: dict[str, Any]) -> None:
    assert "NODES" in render(status, 80)
