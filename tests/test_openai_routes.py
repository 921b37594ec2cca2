"""Every OpenAI route llama-server serves, through the gateway, with the official ``openai`` client.

One mesh for the module: ``host`` serves SmolLM2 (chat, with a Jinja template that knows tools) and
``tiny-embed`` (the random-weight test model with ``embeddings = true``); ``front`` (a member that
serves nothing) and ``client`` (a passive node: routing table by route request, not gossip) reach
both through tunnels. Each route is checked on both gateways: chat with a tool-call round
trip, a streamed chat's usage chunk (``stream_options.include_usage``), ``/v1/completions``,
``/v1/embeddings``, and ``/v1/models`` with context length and size. Below them, the unit tests of
``[models.settings]`` and of the llama-server arguments it gives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import openai
import pytest

from meshllm.config import ConfigError, ModelSettings, parse_config
from meshllm.config.sections import NodeConfig
from meshllm.models.catalog import ModelRef, resolve_model
from meshllm.node import Node, resolve_models
from meshllm.routing import build_table, model_list
from meshllm.serving.process_specs import model_args, server_spec, split_server_spec
from meshllm.wire.messages import HostInfo, PeerAnnouncement
from tests.support import LogCapture, node_config, wait_until
from tests.tinymodel import N_EMBD

CHAT = "smollm2-135m"
EMBED = "tiny-embed"
TEMPLATE = Path(__file__).parent / "data" / "chatml-tools.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SIDES = ("host", "front", "client")


@dataclasses.dataclass
class Mesh:
    """The module's two nodes, by name."""

    nodes: dict[str, Node]
    embed_path: Path

    def client(self, side: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.nodes[side].api_url, api_key="unused", max_retries=0, timeout=120)


def start_node(tmp: Path, name: str, started: list[Node], **options: Any) -> Node:
    settings: dict[str, ModelSettings] = options.pop("settings", {})
    cfg = node_config(tmp, name, **options)
    cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, settings=settings))
    node = Node(cfg, log_stream=LogCapture()).start()
    started.append(node)
    return node


def listed(c: openai.OpenAI) -> dict[str, dict[str, Any]]:
    return {m.id: m.model_dump() for m in c.models.list().data}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("routes")
    embed_path = tmp / f"{EMBED}.gguf"
    shutil.copyfile(tiny_gguf, embed_path)
    started: list[Node] = []
    try:
        settings = {CHAT: ModelSettings(chat_template_file=TEMPLATE), EMBED: ModelSettings(embeddings=True)}
        host = start_node(tmp, "host", started, serve=(CHAT, str(embed_path)), settings=settings)
        front = start_node(tmp, "front", started, join=(host.invite_token,))
        client = start_node(tmp, "client", started, join=(host.invite_token,), role="client")
        m = Mesh({"host": host, "front": front, "client": client}, embed_path)
        for side in SIDES:
            wait_until(
                lambda side=side: {CHAT, EMBED} <= set(listed(m.client(side))),
                timeout=180,
                what=f"both models served, seen from {side}",
            )
        yield m
    finally:
        for node in reversed(started):
            try:
                node.stop(leave=False)
            except Exception:
                pass


# -- the routes, on the host's own gateway and through another node's ----------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("side", SIDES)
def test_models_list_context_length_and_size(mesh: Mesh, side: str) -> None:
    models = listed(mesh.client(side))
    chat_file = resolve_model(CHAT)
    assert isinstance(chat_file, ModelRef)
    for name, path in ((CHAT, chat_file.path), (EMBED, mesh.embed_path)):
        entry = models[name]
        assert entry["object"] == "model" and entry["owned_by"] == "meshllm"
        assert entry["context_length"] == 4096  # [models] context, what llama-server runs it with
        assert entry["size_bytes"] == path.stat().st_size
        assert entry["meta"] == {"n_ctx": 4096, "size": path.stat().st_size}  # llama-server's names


@pytest.mark.llama
@pytest.mark.parametrize("side", SIDES)
def test_tool_call_round_trip(mesh: Mesh, side: str) -> None:
    """tool_choice="required" makes llama-server's grammar hold the answer to a call of the given tool
    once it starts one; the earlier turn shows a 135M model where to start."""
    c = mesh.client(side)
    messages: list[Any] = [
        {"role": "user", "content": "What is the weather in London?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "London"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"sky": "rain"})},
        {"role": "assistant", "content": "It is raining in London."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    first = c.chat.completions.create(
        model=CHAT, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=40, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})})
    final = c.chat.completions.create(
        model=CHAT, messages=messages, tools=[WEATHER], max_tokens=16, temperature=0
    )
    answer = final.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "sunny" in (answer.message.content or "").lower(), answer.message.content


@pytest.mark.llama
@pytest.mark.parametrize("side", SIDES)
def test_streamed_chat_ends_with_the_usage_chunk(mesh: Mesh, side: str) -> None:
    stream = mesh.client(side).chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(text) > 1
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0
    assert 0 < last.usage.completion_tokens <= 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


@pytest.mark.llama
@pytest.mark.parametrize("side", SIDES)
def test_completions(mesh: Mesh, side: str) -> None:
    c = mesh.client(side)
    reply = c.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    streamed = c.completions.create(
        model=CHAT,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == reply.choices[0].text
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    )


@pytest.mark.llama
def test_embeddings_on_both_gateways(mesh: Mesh) -> None:
    inputs = ["the weather in Paris", "a tool call round trip"]
    vectors: dict[str, list[list[float]]] = {}
    for side in SIDES:
        reply = mesh.client(side).embeddings.create(model=EMBED, input=inputs)
        assert reply.object == "list" and [d.index for d in reply.data] == [0, 1]
        assert reply.usage.prompt_tokens > 0
        for d in reply.data:
            assert len(d.embedding) == N_EMBD
            assert math.isclose(math.hypot(*d.embedding), 1.0, rel_tol=1e-3)  # llama-server normalises
        vectors[side] = [d.embedding for d in reply.data]
    assert vectors["host"][0] != vectors["host"][1]
    for side in ("front", "client"):
        for remote, local in zip(vectors[side], vectors["host"], strict=True):
            assert remote == pytest.approx(local, abs=1e-5)  # the same model, through a tunnel
    single = mesh.client("client").embeddings.create(model=EMBED, input=inputs[0])
    assert single.data[0].embedding == pytest.approx(vectors["host"][0], abs=1e-5)


@pytest.mark.llama
def test_embeddings_of_an_unknown_model_is_an_openai_404(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        mesh.client("front").embeddings.create(model="nope", input="x")
    assert err.value.code == "model_not_found"


# -- [models.settings] and the llama-server arguments it gives ------------------------------------------


def parsed(settings: dict[str, Any], serve: tuple[str, ...] = ("m",)) -> NodeConfig:
    return parse_config(
        {"node": {"name": "n"}, "models": {"serve": list(serve), "settings": settings}}, Path("/cfg")
    )


def test_settings_parse_per_model() -> None:
    cfg = parsed({"m": {"embeddings": True, "pooling": "cls"}, "c": {"chat_template_file": "t.jinja"}})
    assert cfg.models.settings == {
        "m": ModelSettings(embeddings=True, pooling="cls"),
        "c": ModelSettings(chat_template_file=Path("/cfg/t.jinja")),
    }
    assert parsed({}).models.settings == {}


@pytest.mark.parametrize(
    ("settings", "key", "words"),
    [
        (
            {"m": {"embedings": True}},
            "models.settings.m.embedings",
            "did you mean models.settings.m.embeddings",
        ),
        ({"m": {"embeddings": "yes"}}, "models.settings.m.embeddings", "boolean"),
        ({"m": {"embeddings": True, "pooling": "max"}}, "models.settings.m.pooling", "mean, cls, last"),
        ({"m": {"pooling": "mean"}}, "models.settings.m.pooling", "embeddings = true"),
        ({"m": True}, "models.settings.m", "table"),
    ],
)
def test_settings_errors_name_the_key(settings: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parsed(settings)
    assert err.value.key == key and words in str(err.value)


def test_settings_for_a_model_not_served_is_an_error(tmp_path: Path, tiny_gguf: Path) -> None:
    cfg = node_config(tmp_path, "n", serve=(str(tiny_gguf),))
    good = dataclasses.replace(
        cfg, models=dataclasses.replace(cfg.models, settings={"tiny": ModelSettings()})
    )
    assert [r.name for r in resolve_models(good)[0]] == ["tiny"]
    bad = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, settings={"tiyn": ModelSettings()}))
    with pytest.raises(ConfigError, match=r"models\.settings\.tiyn: not a model this node serves"):
        resolve_models(bad)


def with_pooling(src: Path, dst: Path, pooling: int) -> Path:
    """A copy of a GGUF whose metadata names a pooling type, as embedding models' files do."""
    reader = gguf.GGUFReader(src)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    writer.add_uint32(f"{arch}.pooling_type", pooling)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_llama_server_arguments_per_model(tmp_path: Path, tiny_gguf: Path) -> None:
    ref = ModelRef("tiny", tiny_gguf, tiny_gguf.stat().st_size)
    chat = server_spec(ref, None, context=4096)
    assert "--jinja" in chat.args and "--embeddings" not in chat.args  # tools need the Jinja template
    assert "--jinja" in split_server_spec(ref, None, [5001], (1.0,), 4096).args

    embed = model_args(ref, ModelSettings(embeddings=True), 2048)
    assert embed == ("--jinja", "--embeddings", "--pooling", "mean", "-b", "2048", "-ub", "2048")
    assert model_args(ref, ModelSettings(embeddings=True), None)[-4:] == ("-b", "4096", "-ub", "4096")
    assert model_args(ref, ModelSettings(embeddings=True, pooling="last"), 0)[2:4] == ("--pooling", "last")
    spec = server_spec(ref, None, context=2048, settings=ModelSettings(embeddings=True))
    assert spec.args[spec.args.index("--embeddings") :][:3] == ("--embeddings", "--pooling", "mean")

    pooled = with_pooling(tiny_gguf, tmp_path / "pooled.gguf", 2)  # cls, as a BERT embedding model says
    own = model_args(ModelRef("pooled", pooled, 1), ModelSettings(embeddings=True), 512)
    assert own == ("--jinja", "--embeddings", "-b", "512", "-ub", "512")  # its own pooling stands

    template = model_args(ref, ModelSettings(chat_template_file=Path("/t/x.jinja")), 4096)
    assert template == ("--jinja", "--chat-template-file", "/t/x.jinja")


def test_routing_table_carries_each_models_size_and_context() -> None:
    """From this node's own numbers for what it serves, else from its first peer's announcement."""
    own = HostInfo(node_id="a", addrs=("127.0.0.1:1",), vram_bytes=1)
    peer = PeerAnnouncement(
        node_id="b",
        name="b",
        role="active",
        addrs=("127.0.0.1:2",),
        vram_bytes=1,
        models=("m", "n"),
        serving=("m", "n"),
        model_bytes={"m": 5, "n": 7},
        model_context={"m": 512, "n": 1024},
    )
    table = build_table(own, ("m",), {"m": 9000}, [peer], own_bytes={"m": 3}, own_context={"m": 2048})
    listing = model_list(table)
    assert listing.served == ("m", "n")
    assert [(d.name, d.size_bytes, d.context_length) for d in listing.details] == [
        ("m", 3, 2048),
        ("n", 7, 1024),
    ]
