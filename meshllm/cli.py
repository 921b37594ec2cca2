"""The ``meshllm`` command line: run a node, print its invite token, download and list models."""

from __future__ import annotations

import dataclasses
import signal
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from meshllm.config import ConfigError, HostPort, NodeConfig, default_config, load_config
from meshllm.console import client
from meshllm.models import pull
from meshllm.node import Node, NodeStartError, local_addresses, parse_join_tokens
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteError, MeshMembership

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
        while not stop.wait(1.0):
            pass
    finally:
        node.log.info("node.stopping", reason="signal")
        node.stop(leave=True)


@app.command()
def invite(config: ConfigOption = None) -> None:
    """Print this node's invite token: another node with it in [node] join joins this mesh.

    The running node logs the same token as the `mesh.invite` event.
    """
    cfg = _load(config)
    listen = cfg.node.quic_listen
    if not cfg.node.advertise and listen.port == 0:
        typer.echo(
            "meshllm: node.quic_listen has port 0 (picked at start): read the token from the running "
            "node's mesh.invite log line, or set a fixed port or node.advertise",
            err=True,
        )
        raise typer.Exit(2)
    try:
        tokens = parse_join_tokens(cfg.node.join)
        identity = NodeIdentity.load_or_create(cfg.node.data_dir)
        membership = MeshMembership.resolve(cfg.node.data_dir, tokens)
    except (ConfigError, InviteError, OSError) as exc:
        typer.echo(f"meshllm: {exc}", err=True)
        raise typer.Exit(1) from None
    addrs = (
        tuple(str(a) for a in cfg.node.advertise)
        if cfg.node.advertise
        else local_addresses(listen.host, listen.port)
    )
    typer.echo(membership.invite(identity.node_id, addrs).encode())


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
    raise typer.Exit(client.show(target, as_json, watch, interval))


def main() -> None:
    app(prog_name="meshllm")


if __name__ == "__main__":
    main()
