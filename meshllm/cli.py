"""The ``meshllm`` command line: run a node, print invite tokens, revoke, download and list models."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from meshllm.config import ConfigError, HostPort, NodeConfig, default_config, load_config
from meshllm.console import client
from meshllm.models import pull
from meshllm.net.revocation import RevokeError, revoke_via_node
from meshllm.node import Node, NodeStartError, local_addresses, parse_join_tokens
from meshllm.wire.grants import DEFAULT_TTL_S, GrantError, parse_ttl
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteError, MeshMembership, read_addrs

app = typer.Typer(
    help=(
        "meshllm pools the GPUs (or CPUs) of many machines into one mesh that serves LLMs. Every node "
        "offers an OpenAI-compatible API (default http://127.0.0.1:9337/v1) and a status console "
        "(default http://127.0.0.1:3131/api/status)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def config_invite(cfg: NodeConfig, role: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    """A token for ``role`` from a node's config and data dir (``meshllm invite``): its addresses are
    ``[node] advertise``, else those of a fixed ``quic_listen`` port, else the ones the running node
    wrote to its data dir. InviteError (or ConfigError) says why there is none."""
    data_dir, listen = cfg.node.data_dir, cfg.node.quic_listen
    if cfg.node.advertise:
        addrs = tuple(str(a) for a in cfg.node.advertise)
    elif listen.port != 0:
        addrs = local_addresses(listen.host, listen.port)
    else:
        addrs = read_addrs(data_dir)
        if not addrs:
            raise InviteError(
                "node.quic_listen has port 0 (picked at start) and the node has not started: start it "
                "first (it writes its addresses to its data dir), or set a fixed port or node.advertise"
            )
    membership = MeshMembership.resolve(data_dir, parse_join_tokens(cfg.node.join))
    identity = NodeIdentity.load_or_create(data_dir)
    return membership.invite(identity.node_id, addrs, role, time.time(), ttl_s).encode()


class LogFormat(StrEnum):
    json = "json"
    console = "console"


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="node.toml to use (see config/*.toml for commented examples). Without it: the built-in "
        "default, a solo active node serving smollm2-135m with data in ~/.local/share/meshllm/default.",
        dir_okay=False,
    ),
]


def _load(config: Path | None) -> NodeConfig:
    try:
        return load_config(config) if config is not None else default_config()
    except ConfigError as exc:
        typer.echo(f"meshllm: config error: {exc}", err=True)
        raise typer.Exit(2) from None


EXIT_FATAL = 70  # EX_SOFTWARE: an internal error stopped the node; restart it


@app.command()
def run(
    config: ConfigOption = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="json: one JSON object per line on stderr (default); console: for humans."),
    ] = None,
    log_file: Annotated[
        bool | None,
        typer.Option("--log-file/--no-log-file", help="Also write the log to <data_dir>/node.log."),
    ] = None,
    force_split: Annotated[
        bool,
        typer.Option("--force-split", help="Split served models across nodes even when they fit on one."),
    ] = False,
    quic_listen: Annotated[
        str | None, typer.Option(help="Override [node] quic_listen, host:port (UDP; port 0 picks one).")
    ] = None,
) -> None:
    """Run a node until Ctrl-C or SIGTERM; peers are told it is leaving."""
    cfg = _load(config)
    try:
        if log_format is not None:
            cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, format=log_format.value))
        if log_file is not None:
            cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, file=log_file))
        if force_split:
            cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, force_split=True))
        if quic_listen is not None:
            cfg = cfg.with_node(quic_listen=HostPort.parse(quic_listen, "--quic-listen"))
    except ConfigError as exc:
        typer.echo(f"meshllm: {exc}", err=True)
        raise typer.Exit(2) from None

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = Node(cfg)
    try:
        node.start()
    except (ConfigError, NodeStartError, InviteError) as exc:
        typer.echo(f"meshllm: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        while not stop.wait(1.0) and node.fatal is None:
            pass
    finally:
        if node.fatal is None:
            node.log.info("node.stopping", reason="signal")
        node.stop(leave=True)
    if node.fatal is not None:  # an actor crashed: the node stopped itself; let a service manager restart it
        node.stopped.wait(30.0)
        typer.echo(f"meshllm: stopped: {node.fatal}", err=True)
        raise typer.Exit(EXIT_FATAL)


class InviteRole(StrEnum):
    client = "client"
    standby = "standby"
    active = "active"


@app.command()
def invite(
    config: ConfigOption = None,
    role: Annotated[
        InviteRole,
        typer.Option(
            help="What the token lets its holder do. client: use the mesh's API through routes and "
            "HTTP tunnels, nothing else (the token to share). standby: also hold capacity and promote "
            "itself to a member when the mesh needs it. active: a full member - gossip, serve, split "
            "(RPC tunnels) - and the mesh secret, so it can invite and revoke in turn."
        ),
    ] = InviteRole.client,
    ttl: Annotated[
        str,
        typer.Option(
            help="How long the token admits new nodes: 30m, 24h, 7d, 2w, or never. Nodes admitted "
            "before it expires stay admitted (until revoked)."
        ),
    ] = "24h",
) -> None:
    """Print an invite token for this node's mesh: another node with it in [node] join joins.

    Needs the mesh secret (a node that founded the mesh or joined with an active token). With
    quic_listen port 0 it reads the running node's addresses from its data dir. Each token has a
    token id (meshllm revoke TOKEN_ID cuts off every node that joined with it).
    """
    cfg = _load(config)
    try:
        text = config_invite(cfg, role.value, parse_ttl(ttl))
    except GrantError as exc:
        typer.echo(f"meshllm: --ttl: {exc}", err=True)
        raise typer.Exit(2) from None
    except (ConfigError, InviteError, OSError) as exc:
        typer.echo(f"meshllm: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(text)


@app.command()
def revoke(
    target: Annotated[str, typer.Argument(help="A node id, or the token id of an invite token.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a node or an invite token: the mesh refuses its Hellos and closes its connections.

    Asks the node running on this config's data dir (over its local socket, data_dir/node.sock) to
    sign the revocation with the mesh's authority key and spread it through the mesh; when that node
    is not running, signs it here and the node spreads it when it starts. Needs the mesh secret.
    """
    cfg = _load(config)
    try:
        typer.echo(revoke_via_node(cfg.node.data_dir, target))
    except RevokeError as exc:
        typer.echo(f"meshllm: cannot revoke: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def download(
    ref: Annotated[
        str,
        typer.Argument(
            help="A catalog name (see `meshllm models`), org/repo:file.gguf, org/repo:Q4_K_M (the file or "
            "split shards carrying that quantisation), hf://org/repo/file.gguf, or a hub resolve URL."
        ),
    ],
    config: ConfigOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download even when the model does not fit.")
    ] = False,
) -> None:
    """Fetch a model into the cache, after the fit check a node runs (weights plus KV cache of
    [models] context, x1.1, against this node's memory and the split peers a running node knows).

    Exits 0 with the file's path when it is in the cache, 3 when refused (with the numbers), 1 on
    errors. HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE/HF_HOME and HF_HUB_OFFLINE work as for every hub
    tool; [models] cache_dir overrides the cache.
    """
    raise typer.Exit(pull.download(_load(config), ref, force))


@app.command()
def models(config: ConfigOption = None) -> None:
    """List the catalog and the models already in the cache, with sizes."""
    for line in pull.listing(_load(config)):
        typer.echo(line)


@app.command()
def status(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Ask the node this node.toml configures ([console] listen).", dir_okay=False
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help=f"Ask the console at this URL (default {client.DEFAULT_URL})."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw /api/status JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Print it again every --interval seconds until Ctrl-C.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between two looks with --watch.", min=0.1)] = 1.0,
) -> None:
    """Show a node's picture of the mesh: nodes (roles, capacity and usage bars, GPUs), models (state,
    host and workers, split fractions, shortfall, download, demand) and passive connections.

    Exits 1 with one line when the console cannot be reached. With --watch the screen is redrawn (on a
    terminal; otherwise each look is printed after the last) and an unreachable console is retried.
    """
    if config is not None and url is not None:
        typer.echo("meshllm: give --config or --url, not both", err=True)
        raise typer.Exit(2)
    target = url or client.DEFAULT_URL
    if config is not None:
        try:
            target = client.console_url(_load(config))
        except client.StatusError as exc:
            typer.echo(f"meshllm: {exc}", err=True)
            raise typer.Exit(2) from None
    if watch:
        # Ctrl-C ends a watch even when the shell started it with SIGINT ignored (a background job of a
        # non-interactive shell inherits that, and Python then raises no KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    raise typer.Exit(client.show(target, as_json, watch, interval))


def main() -> None:
    app(prog_name="meshllm")


if __name__ == "__main__":
    main()
