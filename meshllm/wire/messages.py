"""The message catalog: every message an actor receives and every frame a peer sends.

One vocabulary for both, so a gossip frame from a remote node and a topology event between two local
actors are the same classes. Tags are stable and never reused: add new ones at the end of a range.

Ranges: 1-49 wire frames, 50-99 nested structs (untagged on the wire, tagged here for uniqueness),
100-199 mesh actor messages, 200-299 serving (election, supervisor, router), 300+ replies/queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.wire.codec import Message, message

# -- nested structs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuReport:
    """One GPU a node counts, as it announces it: the console draws a bar per GPU for every node."""

    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class PeerAnnouncement:
    """What a node says about itself in gossip; the newest (incarnation, version) wins per node.

    Relayed from node to node, so it is signed by the node it describes (the last two fields) and
    checked on every merge: see :mod:`meshllm.wire.announcement`.
    """

    node_id: str
    name: str
    role: str
    addrs: tuple[str, ...]
    vram_bytes: int
    models: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()
    incarnation: int = 0
    version: int = 0
    rpc_ready: tuple[str, ...] = ()  # models whose rpc-server (split worker share) is up here
    force_split: bool = False  # this node asks for its models to be split even when they fit
    promoted_for: tuple[str, ...] = ()  # a standby that promoted itself to serve these models
    demand: dict[str, float] = field(default_factory=dict)  # requests/min this node counted, per model
    stuck: tuple[str, ...] = ()  # models it wants but cannot serve now (waiting for memory, refused, failed)
    model_bytes: dict[str, int] = field(default_factory=dict)  # size of each of its models (0: not known yet)
    gpus: tuple[GpuReport, ...] = ()  # free memory re-announced when it moves by 256 MiB or more
    public_key: bytes = b""  # the node's raw Ed25519 key: node_id must be node_id_of(public_key)
    signature: bytes = b""  # by that key, over meshllm.wire.announcement.announcement_payload
    model_context: dict[str, int] = field(default_factory=dict)  # context (tokens) it serves each with

    def newer_than(self, other: PeerAnnouncement) -> bool:
        return (self.incarnation, self.version) > (other.incarnation, other.version)


# -- wire frames ---------------------------------------------------------------------------------------


@message(61)
@dataclass(frozen=True)
class Grant(Message):
    """What an invite lets its holder do, signed by the mesh's authority key.

    ``role`` is the most a connection that presents it may do (client < standby < active),
    ``expires_at`` unix seconds (0: never), ``node_id`` binds it to one node key ("" = whoever holds
    the token). See :mod:`meshllm.wire.grants` for the payload and the rules.
    """

    mesh_id: str
    role: str
    token_id: str
    expires_at: int
    node_id: str
    signature: bytes


@message(62)
@dataclass(frozen=True)
class Revocation(Message):
    """A node id or token id the mesh no longer admits, signed by the mesh's authority key."""

    mesh_id: str
    target: str
    issued_at: int
    signature: bytes


@message(1)
@dataclass(frozen=True)
class Hello(Message):
    """First frame a connection's initiator sends (and the answer it gets): proves key and capability.

    ``signature`` is an Ed25519 signature with the node key over
    :func:`meshllm.wire.admission.hello_payload` of the other fields, ``grant`` included, so a Hello
    cannot be moved to another target, node or grant. The initiator's Hello carries its grant; the
    answer carries none (the dialler knows whom it dialled, and a grant handed out could be replayed).
    What a connection may do is what the grant allows, never what ``role`` says.
    """

    mesh_id: str
    node_id: str
    public_key: bytes
    role: str
    target: str
    nonce: bytes
    grant: Grant | None
    signature: bytes


@message(2)
@dataclass(frozen=True)
class Refused(Message):
    """The stream was refused; the reason is for both sides' logs."""

    reason: str


@message(12)
@dataclass(frozen=True)
class RevocationList(Message):
    """Revocations a node passes on (a REVOCATION stream): each is checked against the mesh's
    authority key before it is applied, whoever relayed it."""

    revocations: tuple[Revocation, ...]


@message(13)
@dataclass(frozen=True)
class RevokeRequest(Message):
    """``meshllm revoke`` -> the running node, on its local socket: sign and spread a revocation."""

    target: str


@message(3)
@dataclass(frozen=True)
class Gossip(Message):
    """A node's view of the active mesh: its own announcement and every active peer it knows."""

    announcements: tuple[PeerAnnouncement, ...]


@message(4)
@dataclass(frozen=True)
class PeerDown(Message):
    """Death notice: ``reporter`` decided ``node_id`` (at ``incarnation``) is dead."""

    node_id: str
    incarnation: int
    reporter: str


@message(5)
@dataclass(frozen=True)
class PeerLeaving(Message):
    """A node is shutting down on purpose."""

    node_id: str
    incarnation: int


@message(6)
@dataclass(frozen=True)
class Ack(Message):
    """Empty acknowledgement of a one-shot frame."""


# -- mesh actor messages ---------------------------------------------------------------------------------


@message(100)
@dataclass(frozen=True)
class GossipReceived(Message):
    """Transport -> registry: a valid gossip exchange happened with ``peer_id``."""

    peer_id: str
    announcements: tuple[PeerAnnouncement, ...]


@message(101)
@dataclass(frozen=True)
class GossipFailed(Message):
    """Transport -> registry: could not exchange gossip with a node (unreachable or refused)."""

    node_id: str
    addrs: tuple[str, ...]
    reason: str


@message(102)
@dataclass(frozen=True)
class ExchangeGossip(Message):
    """Registry -> transport: connect if needed and exchange gossip with one node."""

    node_id: str
    addrs: tuple[str, ...]
    gossip: Gossip


@message(103)
@dataclass(frozen=True)
class GossipSnapshot(Message):
    """Registry -> transport: the view to answer incoming gossip with, until the next snapshot."""

    gossip: Gossip


@message(120)
@dataclass(frozen=True)
class ForgetPeer(Message):
    """Registry -> transport: close our connections to a node we consider dead."""

    node_id: str


@message(104)
@dataclass(frozen=True)
class ProbePeer(Message):
    """Heartbeat -> transport: check that a peer answers (reconnecting if there is no connection)."""

    node_id: str
    addrs: tuple[str, ...]
    timeout_s: float


@message(105)
@dataclass(frozen=True)
class ProbeResult(Message):
    """Transport -> heartbeat: the outcome of one probe."""

    node_id: str
    ok: bool
    rtt_ms: float
    error: str = ""


@message(106)
@dataclass(frozen=True)
class ConnectionLost(Message):
    """Transport -> registry and heartbeat: the last connection to a node closed."""

    node_id: str
    reason: str


@message(107)
@dataclass(frozen=True)
class PeerJoined(Message):
    """Topology event: a node passed a direct gossip exchange and is now an active peer."""

    peer: PeerAnnouncement


@message(108)
@dataclass(frozen=True)
class PeerUpdated(Message):
    """Topology event: an active peer's announcement changed."""

    peer: PeerAnnouncement


@message(109)
@dataclass(frozen=True)
class PeerDied(Message):
    """Topology event: an active peer is dead (probes failed, or a death notice arrived)."""

    node_id: str
    incarnation: int
    reason: str


@message(110)
@dataclass(frozen=True)
class PeerLeft(Message):
    """Topology event: an active peer left on purpose."""

    node_id: str
    incarnation: int


@message(111)
@dataclass(frozen=True)
class PeerDownReceived(Message):
    """Transport -> registry (on a passive node: the passive router): a death notice arrived from
    ``from_peer``. ``routes``: the routing table the sender pushed with it, the dead node already out
    of it, so a passive node need not ask for one (None from older nodes, and between members)."""

    notice: PeerDown
    from_peer: str
    routes: RouteTable | None = None


@message(112)
@dataclass(frozen=True)
class PeerLeavingReceived(Message):
    """Transport -> registry (on a passive node: the passive router): a leaving notice arrived, with
    the leaver's routing table without itself when it pushed one (``routes``, as for a death)."""

    notice: PeerLeaving
    routes: RouteTable | None = None


@message(113)
@dataclass(frozen=True)
class DeclareDead(Message):
    """Heartbeat -> registry: a peer is dead. ``broadcast``: we found out ourselves, so tell everyone
    (a death we accepted from someone else's notice is not re-broadcast)."""

    node_id: str
    reason: str
    broadcast: bool = True


@message(114)
@dataclass(frozen=True)
class BroadcastPeerDown(Message):
    """Registry -> transport: tell every open connection that a node is dead, and drop ours to it.
    Passive connections get this node's routing table with the notice. ``members`` False: only the
    passive connections (the death came from another member's notice, which the members have had;
    our passive nodes hear of deaths only from us)."""

    notice: PeerDown
    members: bool = True
    served: tuple[str, ...] = ()  # the models the dead node announced serving, kept in the pushed table


@message(115)
@dataclass(frozen=True)
class Leave(Message):
    """Node -> transport: send leaving notices to every connection and close them."""

    notice: PeerLeaving
    timeout_s: float


@message(116)
@dataclass(frozen=True)
class Tick(Message):
    """A timer fired; ``name`` says which (an actor may run several)."""

    name: str


@message(117)
@dataclass(frozen=True)
class SetLocalAnnouncement(Message):
    """Node/election -> registry: what this node now says about itself (models, serving, VRAM)."""

    models: tuple[str, ...]
    serving: tuple[str, ...]
    vram_bytes: int
    rpc_ready: tuple[str, ...] = ()
    stuck: tuple[str, ...] = ()
    model_bytes: dict[str, int] = field(default_factory=dict)
    model_context: dict[str, int] = field(default_factory=dict)


@message(118)
@dataclass(frozen=True)
class JoinMesh(Message):
    """Node -> registry: bootstrap from invite tokens' addresses (node id and addresses each)."""

    seeds: tuple[Seed, ...]


@dataclass(frozen=True)
class Seed:
    """A node to start gossip with: its id and where it listens."""

    node_id: str
    addrs: tuple[str, ...]


@message(121)
@dataclass(frozen=True)
class DeathReported(Message):
    """Registry -> heartbeat: another node says an active peer is dead; the heartbeat checks that
    against its own evidence before anyone acts on it."""

    notice: PeerDown


@message(122)
@dataclass(frozen=True)
class LoopPulse(Message):
    """Transport -> heartbeat: the transport's event loop runs (every second while on time). After it
    ran late (a starved or overloaded node), ``lost_s`` is the time it lost: the pings it sent and
    the answers it read meanwhile were that late."""

    lost_s: float


@message(119)
@dataclass(frozen=True)
class Subscribe(Message):
    """Ask an actor to tell the named actor its events from now on."""

    subscriber: str


# -- queries and replies ------------------------------------------------------------------------------


@message(300)
@dataclass(frozen=True)
class GetStatus(Message):
    """Ask the registry for the node's view, for ``/api/status``."""


@dataclass(frozen=True)
class PeerStatus:
    """One active peer as ``/api/status`` shows it."""

    node_id: str
    name: str
    role: str
    vram_bytes: int
    models: tuple[str, ...]
    serving: tuple[str, ...]
    last_seen_s: float
    addrs: tuple[str, ...] = ()
    model_bytes: dict[str, int] = field(default_factory=dict)
    gpus: tuple[GpuReport, ...] = ()


@message(301)
@dataclass(frozen=True)
class StatusReply(Message):
    """The registry's answer to :class:`GetStatus`."""

    node_id: str
    name: str
    role: str
    vram_bytes: int
    peers: tuple[PeerStatus, ...]
    dead: tuple[str, ...] = field(default=())


@message(302)
@dataclass(frozen=True)
class TransportStats(Message):
    """The transport's counters (bytes and frames by stream kind, connections)."""

    connections: int
    passive_connections: int
    bytes_sent: dict[str, int]
    frames_sent: dict[str, int]
    frames_received: dict[str, int]
    probes_sent: int
    rpc_bytes_to_workers: int = 0  # host side of RPC tunnels: llama-server -> remote rpc-servers
    rpc_bytes_from_workers: int = 0
    rpc_bytes_served_in: int = 0  # worker side: bytes a remote host sent to our rpc-server
    rpc_bytes_served_out: int = 0
    standby_connections: int = 0  # passive connections whose Hello said "standby"


@message(303)
@dataclass(frozen=True)
class GetTransportStats(Message):
    """Ask the transport bridge for :class:`TransportStats`."""


# -- serving: supervisor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSpec:
    """One llama.cpp child the node should be running. ``key`` is its identity across plans: the same
    key with the same spec is left alone; a changed spec under a key is a restart."""

    key: str
    kind: str  # "llama-server" | "rpc-server"
    model_path: str  # GGUF for llama-server; "" for rpc-server
    args: tuple[str, ...] = ()  # extra arguments (--rpc, --tensor-split, -ngl, ...)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (LLAMA_CACHE for rpc-server)


@message(200)
@dataclass(frozen=True)
class DesiredProcesses(Message):
    """Election -> supervisor: exactly these children should run (anything else is stopped)."""

    specs: tuple[ProcessSpec, ...]


@message(201)
@dataclass(frozen=True)
class LlamaReady(Message):
    """Supervisor -> subscriber: a child is up and healthy on a loopback port."""

    key: str
    kind: str
    port: int
    pid: int


@message(202)
@dataclass(frozen=True)
class LlamaFailed(Message):
    """Supervisor -> subscriber: a child failed to start or died; ``retry_in_s`` < 0 means given up."""

    key: str
    kind: str
    reason: str
    log_tail: str
    retry_in_s: float


@message(203)
@dataclass(frozen=True)
class LlamaStopped(Message):
    """Supervisor -> subscriber: a child was stopped because it is no longer desired."""

    key: str
    kind: str


# -- serving: election, router, tunnels -------------------------------------------------------------------


@dataclass(frozen=True)
class HostInfo:
    """A node serving a model, as a gateway needs it to open a tunnel."""

    node_id: str
    addrs: tuple[str, ...]
    vram_bytes: int


@message(7)
@dataclass(frozen=True)
class TunnelRequest(Message):
    """First frame of an HTTP tunnel; the request body follows as raw bytes: ``body_bytes`` of them,
    or until FIN when -1 (a QUIC stream can half-close, a TLS connection cannot)."""

    model: str
    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int = -1


@message(8)
@dataclass(frozen=True)
class TunnelResponse(Message):
    """First frame the host sends back; the response body follows as raw bytes until FIN."""

    status: int
    headers: dict[str, str]


@message(220)
@dataclass(frozen=True)
class LocalServing(Message):
    """Election -> router: this node serves ``model`` on loopback ``port`` (0: no longer); ``kind``
    "rpc-server" is this node's share of a split model, reached by RPC tunnels."""

    model: str
    port: int
    kind: str = "llama-server"


@message(221)
@dataclass(frozen=True)
class Route(Message):
    """Gateway -> router: where can ``model`` be served?"""

    model: str


@message(222)
@dataclass(frozen=True)
class RouteReply(Message):
    """Router -> gateway. ``known``: some node wants or serves it; ``available``: every known model."""

    model: str
    known: bool
    local_port: int
    hosts: tuple[HostInfo, ...]
    available: tuple[str, ...]
    local_rpc_port: int = 0
    spread: bool = True  # rotate requests over hosts; False: hosts are already in preference order


@message(223)
@dataclass(frozen=True)
class ListModels(Message):
    """Gateway -> router: every model the mesh serves or wants."""


@message(224)
@dataclass(frozen=True)
class ModelList(Message):
    """Router -> gateway: the served models (with what is known of each) and the wanted ones."""

    served: tuple[str, ...]
    wanted: tuple[str, ...]
    details: tuple[ModelRoute, ...] = ()  # the served ones' routes: size and context


@message(225)
@dataclass(frozen=True)
class GetPlan(Message):
    """Console -> election: the per-model plan for ``/api/status``."""


@dataclass(frozen=True)
class ModelStatus:
    """One model as ``/api/status`` shows it."""

    name: str
    state: str  # solo | split | worker | starting | waiting | failed | standby | serving (elsewhere)
    hosts: tuple[str, ...]
    host: str = ""
    workers: tuple[str, ...] = ()
    fractions: tuple[float, ...] = ()
    size_bytes: int = 0
    needed_bytes: int = 0
    available_bytes: int = 0
    detail: str = ""
    demand_per_min: float = 0.0


@message(226)
@dataclass(frozen=True)
class PlanReply(Message):
    models: tuple[ModelStatus, ...]


# -- serving: supervisor internals (the supervisor's own helper threads -> the supervisor) -------------


@message(210)
@dataclass(frozen=True)
class ChildExited(Message):
    """A supervised child process ended; ``returncode`` < 0 is the signal that killed it.

    ``generation`` names one start of ``key``, so news about an earlier start is recognised and dropped.
    """

    key: str
    generation: int
    returncode: int


@message(211)
@dataclass(frozen=True)
class ChildHealthy(Message):
    """A supervised child answered its health check for the first time, ``seconds`` after its start."""

    key: str
    generation: int
    seconds: float


@message(212)
@dataclass(frozen=True)
class ChildUnhealthy(Message):
    """A supervised child did not become healthy in time (it is still running)."""

    key: str
    generation: int
    reason: str


@message(213)
@dataclass(frozen=True)
class RestartChild(Message):
    """The backoff after a failure of ``key`` (at ``generation``) is over: start it again if still wanted."""

    key: str
    generation: int


# -- tensor split ---------------------------------------------------------------------------------------


@message(9)
@dataclass(frozen=True)
class RpcTunnelRequest(Message):
    """First frame of an RPC tunnel stream: connect me to your rpc-server for ``model``; raw
    ggml-rpc bytes follow both ways."""

    model: str


@message(230)
@dataclass(frozen=True)
class EnsureRpcListeners(Message):
    """Election -> transport: loopback TCP listeners that tunnel to each worker's rpc-server for a
    model (listeners for other workers of that model are closed). Empty ``workers``: close all.
    A tell, never an ask: the transport answers with an :class:`RpcListeners` told back."""

    model: str
    workers: tuple[Seed, ...]


@message(234)
@dataclass(frozen=True)
class AllowRpcHost(Message):
    """Election -> transport: the one node whose RPC tunnels this node's rpc-server for ``model``
    accepts - the host of the plan in which this node is a worker; ``""``: none. llama.cpp's
    rpc-server gives whoever connects arbitrary reads and writes of its memory, so a tunnel from
    anyone else is refused, and open tunnels from a node that is no longer the host are closed."""

    model: str
    host: str


@message(231)
@dataclass(frozen=True)
class RpcListeners(Message):
    """Transport -> election: the loopback port per worker node id (``error`` when it failed)."""

    model: str
    ports: dict[str, int]
    error: str = ""


@message(233)
@dataclass(frozen=True)
class RpcCacheFilled(Message):
    """Election's fill thread -> election: the rpc-server tensor cache holds this model's large
    tensors (or could not be filled: ``error``), so its rpc-server may start."""

    model: str
    files: int
    bytes_written: int
    error: str = ""


@message(232)
@dataclass(frozen=True)
class RpcTunnelFailed(Message):
    """Transport -> election: an RPC tunnel to a worker could not be opened or broke."""

    model: str
    worker: str
    reason: str


# -- passive nodes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRoute:
    """One model in a routing table: the nodes serving it now, and (0: not known) its weights' size
    and the context its first host serves it with."""

    name: str
    hosts: tuple[HostInfo, ...]
    size_bytes: int = 0
    context_length: int = 0


@message(10)
@dataclass(frozen=True)
class RouteRequest(Message):
    """A passive node asks an active node for the routing table (instead of gossiping). A standby about
    to promote names the model it ``claim``s, with its race key: the first claim wins."""

    claim: str = ""
    claim_key: float = 0.0
    asked: dict[str, int] = field(
        default_factory=dict
    )  # requests since the last refresh for models with no host


@dataclass(frozen=True)
class Claim:
    """A standby's claim on a gap, as active nodes saw it (kept a short while)."""

    model: str
    node_id: str
    key: float


@message(11)
@dataclass(frozen=True)
class RouteTable(Message):
    """The answer to a RouteRequest: served models with their hosts, models wanted but not served,
    and active nodes a passive node may ask next time."""

    models: tuple[ModelRoute, ...]
    unserved: tuple[str, ...]
    actives: tuple[Seed, ...]
    claimed: tuple[str, ...] = ()  # models a promoted standby has taken (served or not yet)
    demand: dict[str, float] = field(default_factory=dict)  # requests/min across the active mesh
    stuck: tuple[str, ...] = ()  # unserved models that every node wanting them cannot serve now
    claims: tuple[Claim, ...] = ()  # recent claims of standbys about to promote


@message(240)
@dataclass(frozen=True)
class RouteSnapshot(Message):
    """Router -> transport: the table to answer route requests with, until the next snapshot, and
    what else the router answers a Route with (this node's id and loopback ports), so the gateway
    and the tunnels on the endpoint's loop answer themselves (:func:`meshllm.routing.route_reply`)."""

    table: RouteTable
    own_id: str = ""
    local_ports: dict[str, int] = field(default_factory=dict)  # this node's llama-server per model
    local_rpc_ports: dict[str, int] = field(default_factory=dict)  # its rpc-server per model


@message(241)
@dataclass(frozen=True)
class RefreshRoutes(Message):
    """Passive router -> transport: fetch the routing table from one of these active nodes, or from
    all of them (``every``: a standby, which must hear every survivor's death notices)."""

    actives: tuple[Seed, ...]
    every: bool = False
    claim: str = ""
    claim_key: float = 0.0
    asked: dict[str, int] = field(default_factory=dict)


@message(242)
@dataclass(frozen=True)
class RoutesReceived(Message):
    """Transport -> passive router: a fresh table from ``source``."""

    source: str
    table: RouteTable


@message(243)
@dataclass(frozen=True)
class RoutesFailed(Message):
    """Transport -> passive router: no active node answered a route request."""

    reason: str


@message(244)
@dataclass(frozen=True)
class HostFailed(Message):
    """Gateway -> router: a tunnel to this host failed before any response byte."""

    model: str
    node_id: str


# -- models: the downloader and the election --------------------------------------------------------


@message(320)
@dataclass(frozen=True)
class ModelDescribed(Message):
    """Downloader -> election: what a hub model needs, from the hub's metadata (no weight fetched),
    or why it cannot be had (``error``)."""

    model: str
    size_bytes: int
    kv_bytes: int
    error: str = ""


@message(321)
@dataclass(frozen=True)
class FetchModel(Message):
    """Election -> downloader: the fit check passed and this node needs the file (solo or split host)."""

    model: str


@message(322)
@dataclass(frozen=True)
class RefuseModel(Message):
    """Election -> downloader: the model fits neither here nor in a split: fetch nothing."""

    model: str
    needed_bytes: int
    available_bytes: int
    reason: str


@message(323)
@dataclass(frozen=True)
class ModelFetched(Message):
    """Downloader -> election: the model's file(s) are in the cache and verified (or ``error``)."""

    model: str
    path: str
    size_bytes: int
    kv_bytes: int
    error: str = ""


@message(324)
@dataclass(frozen=True)
class DownloadProgressed(Message):
    """A download thread -> the downloader: bytes so far."""

    model: str
    done_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class DownloadStatus:
    """One hub model as ``/api/status`` shows its download."""

    model: str
    ref: str
    state: str  # resolving | cached | described | downloading | done | refused | failed
    done_bytes: int = 0
    total_bytes: int = 0
    rate_bytes_s: float = 0.0
    needed_bytes: int = 0
    available_bytes: int = 0
    reason: str = ""


@message(325)
@dataclass(frozen=True)
class GetDownloads(Message):
    """Console -> downloader."""


@message(326)
@dataclass(frozen=True)
class DownloadsReply(Message):
    jobs: tuple[DownloadStatus, ...]


# -- standby promotion -------------------------------------------------------------------------------


@message(330)
@dataclass(frozen=True)
class RoutesChanged(Message):
    """Passive router -> subscribers (the standby): the table after every refresh or notice."""

    table: RouteTable
    fresh: bool = True  # from an active node just now (False: after a notice, before the refresh)


@message(331)
@dataclass(frozen=True)
class HostsLost(Message):
    """Passive router -> subscribers: a host died or left, with the models it served."""

    node_id: str
    reason: str  # death | leave
    models: tuple[str, ...]


@message(332)
@dataclass(frozen=True)
class RefreshNow(Message):
    """Standby -> passive router: fetch the table now (a fresh look before promoting), claiming a model."""

    claim: str = ""
    claim_key: float = 0.0


@message(333)
@dataclass(frozen=True)
class GetStandby(Message):
    """Console -> standby."""


@message(334)
@dataclass(frozen=True)
class StandbyReply(Message):
    """What a standby (or a promoted node) would take, is taking, or took."""

    offers: tuple[str, ...]
    capacity_bytes: int
    pending: str = ""  # the model it is about to take
    pending_reason: str = ""
    promoted_for: str = ""


@message(335)
@dataclass(frozen=True)
class SetDemand(Message):
    """Gateway -> registry, router, standby: this node's requests per minute per model (every 10 s
    when they changed)."""

    demand: dict[str, float]


@message(336)
@dataclass(frozen=True)
class GetRouteTable(Message):
    """Console -> router (active or passive): the routing table as it stands."""


@message(337)
@dataclass(frozen=True)
class ClaimSeen(Message):
    """Transport -> router: a standby claimed a model in its route request."""

    claim: Claim


@message(338)
@dataclass(frozen=True)
class AskedFor(Message):
    """Transport -> router: a passive node's requests for models it found no host for (demand that
    would otherwise be answered 404 at the client and counted nowhere)."""

    asked: dict[str, int]
