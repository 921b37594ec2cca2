"""The console's picture of the mesh as plain text, for ``meshllm status`` in a terminal.

A pure function of the ``/api/status`` JSON and a width: no I/O, so it can be tested on any dict. The
JSON comes from another process (maybe another version of meshllm), so every field is read defensively:
a missing or odd field leaves a gap or a ``?`` in the picture, never an exception.

Everything in ``/api/status`` is the answering node's view: its own GPUs, its models' plans, and the
active peers it knows. Node usage is what the models it runs take: the whole size of a model it serves
alone, its fraction of a model split over a host and workers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WARN_FRACTION", "render"]

WARN_FRACTION = 0.8  # a node or GPU fuller than this gets the warning marker
WARN = "!"
MIN_WIDTH = 40
SHORT_ID = 8


# -- reading odd JSON ----------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _text(value: Any, default: str = "") -> str:
    if value is None:
        return default
    # One line whatever it holds: control characters would break the layout (or the terminal).
    return "".join(c if c.isprintable() else " " for c in str(value)).strip() or default


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _short(node_id: str) -> str:
    return node_id[:SHORT_ID] if node_id else "?"


# -- formatting ----------------------------------------------------------------------------------------


def size(n: float | None) -> str:
    """Bytes for people: ``433.0 KiB``, ``2.0 GiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"  # unreachable: the loop returns at TiB


def bar(fraction: float | None, width: int) -> str:
    """``[#####.....]`` filled to ``fraction`` (clamped to 0..1); ``[?????]`` when unknown."""
    width = max(width, 1)
    if fraction is None:
        return "[" + "?" * width + "]"
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def percent(fraction: float | None) -> str:
    if fraction is None:
        return "  ?%"
    mark = WARN if fraction > WARN_FRACTION else " "
    return f"{min(fraction, 99.99) * 100:3.0f}%{mark}"


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


# -- the model of the picture --------------------------------------------------------------------------


@dataclass
class NodeView:
    """One node as the picture shows it: from the status's top level (``is_self``) or a peer entry."""

    node_id: str
    name: str
    role: str
    vram: float | None
    serving: set[str]
    is_self: bool = False
    gpus: list[Mapping[str, Any]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    used: float = 0.0
    unknown_sizes: int = 0  # models it runs whose size the status does not give


@dataclass
class ModelView:
    """One model entry, with its members (``[host, *workers]`` of a split) and their fractions."""

    name: str
    state: str
    size: float | None
    hosts: list[str]
    host: str
    workers: list[str]
    fractions: list[float]
    raw: Mapping[str, Any]

    def share_of(self, node_id: str) -> float | None:
        """The fraction of the model's weights on ``node_id`` when it is split; None otherwise."""
        if not self.workers or not node_id:
            return None
        members = [self.host, *self.workers]
        if node_id not in members:
            return None
        i = members.index(node_id)
        if len(self.fractions) == len(members):
            return self.fractions[i]
        return 1.0 / len(members)


def _model(entry: Mapping[str, Any]) -> ModelView:
    fractions = [_num(f) for f in _list(entry.get("fractions"))]
    sz = _num(entry.get("size_bytes"))
    return ModelView(
        name=_text(entry.get("name"), "?"),
        state=_text(entry.get("state"), "?"),
        size=sz if sz else None,  # 0 is what the status says for a model known only through peers
        hosts=[_text(h) for h in _list(entry.get("hosts")) if h],
        host=_text(entry.get("host")),
        workers=[_text(w) for w in _list(entry.get("workers")) if w],
        fractions=[f for f in fractions if f is not None] if None not in fractions else [],
        raw=entry,
    )


def _sizes_from_peers(models: list[ModelView], status: Mapping[str, Any]) -> None:
    """A model this node knows only through peers has no size here: take what its peers announce."""
    announced: dict[str, float] = {}
    for entry in _list(status.get("peers")):
        for name, size in _map(_map(entry).get("model_bytes")).items():
            if (n := _num(size)) and n > announced.get(str(name), 0.0):
                announced[str(name)] = n
    for m in models:
        if m.size is None and m.name in announced:
            m.size = announced[m.name]


def _nodes(status: Mapping[str, Any]) -> list[NodeView]:
    own_id = _text(status.get("node_id"))
    me = NodeView(
        node_id=own_id,
        name=_text(status.get("name"), "?"),
        role=_text(status.get("role"), "?"),
        vram=_num(status.get("vram_bytes")),
        serving=set(),
        is_self=True,
        gpus=[_map(g) for g in _list(status.get("gpus")) if isinstance(g, Mapping)],
    )
    nodes = [me]
    seen = {own_id}
    for entry in _list(status.get("peers")):
        p = _map(entry)
        node_id = _text(p.get("node_id"))
        if node_id in seen and node_id:
            continue
        seen.add(node_id)
        nodes.append(
            NodeView(
                node_id=node_id,
                name=_text(p.get("name"), "?"),
                role=_text(p.get("role"), "?"),
                vram=_num(p.get("vram_bytes")),
                serving={_text(s) for s in _list(p.get("serving"))},
                gpus=[_map(g) for g in _list(p.get("gpus")) if isinstance(g, Mapping)],
            )
        )
    return nodes


def _attribute(nodes: list[NodeView], models: list[ModelView]) -> None:
    """Each node's roles and the bytes the models it runs take there."""
    for node in nodes:
        host = worker = serves = False
        for m in models:
            share = m.share_of(node.node_id)
            runs_here = node.node_id in m.hosts or m.name in node.serving
            if node.is_self and m.host == node.node_id and m.state in ("solo", "split", "starting"):
                runs_here = True  # its own model, still loading: it holds the memory already
            if share is not None:
                if node.node_id == m.host:
                    host = True
                else:
                    worker = True
            elif runs_here:
                serves = True
                share = 1.0
            else:
                continue
            if m.size is None:
                node.unknown_sizes += 1
            else:
                node.used += share * m.size
        node.roles = [r for r, on in (("host", host), ("worker", worker), ("serving", serves)) if on]
        if not node.roles:
            node.roles = ["idle"]


# -- sections ------------------------------------------------------------------------------------------


def _header(status: Mapping[str, Any], nodes: list[NodeView], models: list[ModelView]) -> list[str]:
    me = nodes[0]
    mesh = _text(status.get("mesh_id"), "?")
    n_models = len(models)
    lines = [
        f"mesh {mesh} - seen from {me.name} ({_short(me.node_id)}, {me.role}) - "
        f"{len(nodes)} node{'s' * (len(nodes) != 1)}, {n_models} model{'s' * (n_models != 1)}"
    ]
    dead = [_text(d) for d in _list(status.get("dead")) if d]
    if dead:
        lines.append(f"dead: {', '.join(_short(d) for d in dead)}")
    return lines


def _node_lines(node: NodeView, largest: float | None, width: int) -> list[str]:
    tag = "  (this node)" if node.is_self else ""
    kind = "" if node.role in ("active", "?") else f" [{node.role}]"
    lines = [f"  {node.name} {_short(node.node_id)}{kind}  {', '.join(node.roles)}{tag}"]
    label = 14
    # "    capacity     [bar] 100%! 1023.9 GiB": the bar takes what the labels and numbers leave.
    bar_w = max(10, min(40, width - label - 24))
    capacity = node.vram / largest if node.vram is not None and largest else None
    lines.append(f"    {'capacity':<{label - 4}}{bar(capacity, bar_w)} {size(node.vram):>10}")
    usage = node.used / node.vram if node.vram else None
    used = size(node.used) + ("+?" if node.unknown_sizes else "")
    lines.append(f"    {'in use':<{label - 4}}{bar(usage, bar_w)} {percent(usage)} {used}")
    for g in node.gpus:
        total, free = _num(g.get("total_bytes")), _num(g.get("free_bytes"))
        taken = total - free if total is not None and free is not None else None
        fill = taken / total if taken is not None and total else None
        index = _num(g.get("index"))
        name = _text(g.get("name"), "GPU")
        ident = f"gpu {index:.0f}" if index is not None else "gpu"
        lines.append(
            f"    {ident} {name}: {bar(fill, max(10, bar_w // 2))} {percent(fill)} "
            f"{size(taken)} / {size(total)}"
        )
    return lines


def _names(ids: Sequence[str], by_id: Mapping[str, str]) -> str:
    return ", ".join(by_id.get(i) or _short(i) for i in ids) or "-"


def _model_lines(m: ModelView, by_id: Mapping[str, str], width: int) -> list[str]:
    demand = _num(m.raw.get("demand_per_min"))
    head = f"  {m.name}  {m.state}  {size(m.size)}"
    if demand is not None:
        head += f"  {demand:.1f} req/min"
    lines = [head]
    if m.workers:
        members = [m.host, *m.workers]
        parts = []
        for i, node_id in enumerate(members):
            share = m.share_of(node_id)
            name = by_id.get(node_id) or _short(node_id)
            role = "host" if i == 0 else "worker"
            parts.append(f"{name} ({role} {share * 100:.0f}%)" if share is not None else name)
        lines.append("    split: " + " + ".join(parts))
    if m.hosts:
        lines.append(f"    served by: {_names(m.hosts, by_id)}")
    elif m.state not in ("waiting",):
        lines.append("    served by: nobody yet")
    detail = _text(m.raw.get("detail"))
    download = _map(m.raw.get("download"))
    fetching = _text(download.get("state")) not in ("", "done", "cached")
    if m.state == "waiting" and not fetching:
        needed, available = _num(m.raw.get("needed_bytes")), _num(m.raw.get("available_bytes"))
        if needed is not None and available is not None and needed > available:
            lines.append(
                f"    waiting: short by {size(needed - available)} "
                f"(needs {size(needed)}, the group has {size(available)})"
            )
        else:
            lines.append("    waiting: for a node that can serve it")
    if download:
        lines += _download_lines(download, width)
    if detail:
        lines += textwrap.wrap(
            f"reason: {detail}",
            width=max(width, MIN_WIDTH),
            initial_indent="    ",
            subsequent_indent="      ",
        )
    return lines


def _download_lines(d: Mapping[str, Any], width: int) -> list[str]:
    state = _text(d.get("state"), "?")
    done, total = _num(d.get("done_bytes")), _num(d.get("total_bytes"))
    if state == "downloading":
        fill = done / total if done is not None and total else None
        rate = _num(d.get("rate_bytes_s"))
        speed = f"  {size(rate)}/s" if rate else ""
        return [
            f"    downloading {bar(fill, max(10, min(30, width - 62)))} {percent(fill).rstrip(WARN)} "
            f"{size(done)} / {size(total)}{speed}"
        ]
    if state == "refused":
        needed, available = _num(d.get("needed_bytes")), _num(d.get("available_bytes"))
        why = _text(d.get("reason"), "does not fit")
        numbers = f" (needs {size(needed)}, has {size(available)})" if needed is not None else ""
        return textwrap.wrap(
            f"download refused: {why}{numbers}",
            width=max(width, MIN_WIDTH),
            initial_indent="    ",
            subsequent_indent="      ",
        )
    if state in ("done", "cached"):
        return []
    reason = _text(d.get("reason"))
    return [f"    download {state}" + (f": {reason}" if reason else "")]


def _passive_lines(status: Mapping[str, Any]) -> list[str]:
    passive, standby = _num(status.get("passive_connections")), _num(status.get("standby_connections"))
    lines = []
    if passive is not None or standby is not None:
        standbys = standby or 0.0
        clients = max((passive or 0.0) - standbys, 0.0)
        lines.append(f"  clients {clients:.0f}, standbys {standbys:.0f} (connected to this node)")
    own = _map(status.get("standby"))
    if own:
        offers = ", ".join(_text(o) for o in _list(own.get("offers"))) or "-"
        line = f"  this node stands by with {size(_num(own.get('capacity_bytes')))} for: {offers}"
        pending, promoted = _text(own.get("pending")), _text(own.get("promoted_for"))
        if pending:
            line += f"; taking {pending} ({_text(own.get('pending_reason'), '?')})"
        if promoted:
            line += f"; promoted for {promoted}"
        lines.append(line)
    return lines


def render(status: Mapping[str, Any], width: int = 100) -> str:
    """The whole picture of one ``/api/status`` answer, each line at most ``width`` characters."""
    width = max(width, MIN_WIDTH)
    status = _map(status)
    models = [_model(_map(m)) for m in _list(status.get("models"))]
    _sizes_from_peers(models, status)
    nodes = _nodes(status)
    _attribute(nodes, models)
    by_id = {n.node_id: n.name for n in nodes if n.node_id}
    vrams = [n.vram for n in nodes if n.vram]
    largest = max(vrams) if vrams else None

    lines = _header(status, nodes, models)
    lines += ["", f"NODES ({len(nodes)})"]
    for node in nodes:
        lines += _node_lines(node, largest, width)
    lines += ["", f"MODELS ({len(models)})"]
    if not models:
        lines.append("  none")
    for m in models:
        lines += _model_lines(m, by_id, width)
    passive = _passive_lines(status)
    if passive:
        lines += ["", "PASSIVE", *passive]
    return "\n".join(_fit(line, width) for line in lines) + "\n"
