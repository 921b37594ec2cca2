"""The routing table: which nodes serve which model, and what is wanted but not served.

Pure functions over :class:`RouteTable`, shared by the two actors that hold one: the Router on an
active node builds it from the announcements it follows (and publishes it for passive nodes), the
PassiveRouter on a client or standby receives it from an active node. Both answer the gateway from
the table alone, so the two kinds of node cannot disagree about what a table means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from meshllm.wire.messages import (
    Claim,
    HostInfo,
    ModelList,
    ModelRoute,
    PeerAnnouncement,
    RouteReply,
    RouteSnapshot,
    RouteTable,
    Seed,
)


def build_table(
    own: HostInfo,
    own_models: Iterable[str],
    local_ports: Mapping[str, int],
    peers: Iterable[PeerAnnouncement],
    own_claims: Iterable[str] = (),
    own_demand: Mapping[str, float] | None = None,
    own_stuck: Iterable[str] = (),
    claims: Iterable[Claim] = (),
    own_bytes: Mapping[str, int] | None = None,
    own_context: Mapping[str, int] | None = None,
) -> RouteTable:
    """The table of an active node: this node first for what it serves, then its peers by node id.
    A model's size and context are its first host's (``own_bytes``/``own_context`` for this node)."""
    peers = sorted(peers, key=lambda a: a.node_id)
    served = set(local_ports)
    wanted = set(own_models)
    for ann in peers:
        served.update(ann.serving)
        wanted.update(ann.models)
    models = []
    for name in sorted(served):
        hosts = [own] if name in local_ports else []
        hosts += [
            HostInfo(node_id=a.node_id, addrs=a.addrs, vram_bytes=a.vram_bytes)
            for a in peers
            if name in a.serving
        ]
        sizes = [(own_bytes or {}).get(name, 0)] if name in local_ports else []
        contexts = [(own_context or {}).get(name, 0)] if name in local_ports else []
        sizes += [a.model_bytes.get(name, 0) for a in peers if name in a.serving]
        contexts += [a.model_context.get(name, 0) for a in peers if name in a.serving]
        models.append(
            ModelRoute(
                name=name,
                hosts=tuple(hosts),
                size_bytes=next((n for n in sizes if n), 0),
                context_length=next((n for n in contexts if n), 0),
            )
        )
    actives = (Seed(own.node_id, own.addrs), *(Seed(a.node_id, a.addrs) for a in peers))
    claimed = set(own_claims)
    demand: dict[str, float] = dict(own_demand or {})
    wanting: dict[str, list[bool]] = {}  # model -> for each active node wanting it: is it stuck?
    mine = set(own_stuck)
    for model in own_models:
        wanting.setdefault(model, []).append(model in mine)
    for ann in peers:
        for model in ann.models:
            wanting.setdefault(model, []).append(model in ann.stuck)
    for ann in peers:
        claimed.update(ann.promoted_for)
        for model, count in ann.demand.items():
            demand[model] = demand.get(model, 0.0) + count
    return RouteTable(
        models=tuple(models),
        unserved=tuple(sorted(wanted - served)),
        actives=actives,
        claimed=tuple(sorted(claimed)),
        demand=demand,
        stuck=tuple(sorted(m for m in wanted - served if all(wanting.get(m, [False])))),
        claims=tuple(sorted(claims, key=lambda c: (c.model, c.key, c.node_id))),
    )


def drop_host(table: RouteTable, node_id: str, model: str | None = None) -> RouteTable:
    """The table without ``node_id`` as a host: of ``model`` only (a tunnel to it failed), or of every
    model and as an active node too (``model`` None: it died or left). The same table when it had none."""
    models = tuple(
        replace(m, hosts=tuple(h for h in m.hosts if h.node_id != node_id))
        if (model is None or m.name == model) and any(h.node_id == node_id for h in m.hosts)
        else m
        for m in table.models
    )
    actives = table.actives
    if model is None and any(s.node_id == node_id for s in actives):
        actives = tuple(s for s in actives if s.node_id != node_id)
    if models == table.models and actives is table.actives:
        return table
    return replace(table, models=models, actives=actives)


def without_dead_host(table: RouteTable, node_id: str, served: Iterable[str] = ()) -> RouteTable:
    """The table to push with ``node_id``'s death notice: without it as a host, and with each model of
    ``served`` (what it announced serving) that the table no longer lists kept as a model with no host.
    The sender's router may have rebuilt its table without the dead node already; a passive node whose
    own table had not yet seen that node serve them still learns those models lost their host."""
    dropped = drop_host(table, node_id)
    listed = {m.name for m in dropped.models}
    lost = tuple(ModelRoute(name, ()) for name in dict.fromkeys(served) if name not in listed)
    return replace(dropped, models=dropped.models + lost) if lost else dropped


def hostless(table: RouteTable) -> tuple[str, ...]:
    """The models the table lists with no host."""
    return tuple(m.name for m in table.models if not m.hosts)


def hosted_by(table: RouteTable, node_id: str) -> tuple[str, ...]:
    """The models ``node_id`` is a host of in the table."""
    return tuple(m.name for m in table.models if any(h.node_id == node_id for h in m.hosts))


def hosts_of(table: RouteTable, model: str) -> tuple[HostInfo, ...]:
    return next((m.hosts for m in table.models if m.name == model), ())


def available(table: RouteTable) -> tuple[str, ...]:
    """Every model a request may name: served, or wanted by some node and waiting for a host."""
    return tuple(sorted({m.name for m in table.models} | set(table.unserved)))


def model_list(table: RouteTable) -> ModelList:
    served = sorted((m for m in table.models if m.hosts), key=lambda m: m.name)
    return ModelList(served=tuple(m.name for m in served), wanted=table.unserved, details=tuple(served))


def route_reply(snapshot: RouteSnapshot, model: str) -> RouteReply:
    """An active node's answer to "where is ``model`` served?": its own llama-server (by loopback
    port) and the other hosts in the table. The Router answers a Route ask with it, and the gateway
    and the tunnels compute it from the snapshot the Router published, without a thread hop per request."""
    names = available(snapshot.table)
    return RouteReply(
        model=model,
        known=model in names,
        local_port=snapshot.local_ports.get(model, 0),
        hosts=tuple(h for h in hosts_of(snapshot.table, model) if h.node_id != snapshot.own_id),
        available=names,
        local_rpc_port=snapshot.local_rpc_ports.get(model, 0),
    )
