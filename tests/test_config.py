"""Tests for meshllm.config: defaults, examples, error messages naming the key, HostPort round trips."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.config import (
    ApiSection,
    ConfigError,
    HostPort,
    NodeConfig,
    NodeSection,
    TimingSection,
    default_config,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "config").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


# ------------------------------------------------------------------------------------------- defaults


def test_default_config() -> None:
    cfg = default_config()
    assert cfg.node.name == "meshllm"
    assert cfg.node.role == "active"
    assert cfg.node.data_dir == Path.home() / ".local/share/meshllm/default"
    assert cfg.node.quic_listen == HostPort("0.0.0.0", 9338)
    assert cfg.node.advertise == ()
    assert cfg.node.join == ()
    assert cfg.node.vram_gb is None
    assert cfg.models.serve == ("smollm2-135m",)
    assert cfg.models.force_split is False
    assert cfg.api.listen == HostPort("127.0.0.1", 9337)
    assert cfg.console.listen == HostPort("127.0.0.1", 3131)
    assert cfg.llama.bin_dir is None
    assert cfg.llama.tensor_cache is True
    assert cfg.log.format == "json"
    assert cfg.log.file is False
    assert cfg.timing == TimingSection(2.0, 1.0, 3.5, 60.0, 45.0)
    assert cfg.source is None


def test_default_config_overrides(tmp_path: Path) -> None:
    cfg = default_config(name="b", data_dir=tmp_path, quic_listen=HostPort("127.0.0.1", 0))
    assert cfg.node.name == "b"
    assert cfg.node.data_dir == tmp_path
    assert cfg.node.quic_listen.port == 0
    assert default_config(role="client").models.serve == ()
    with pytest.raises(ConfigError, match=r"node\.role"):
        default_config(role="boss")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    hostname = socket.gethostname()
    assert cfg.node.name == hostname
    assert cfg.node.data_dir == Path.home() / ".local/share/meshllm" / hostname
    assert cfg.node.role == "active"
    assert cfg.node.quic_listen == HostPort("0.0.0.0", 9338)
    assert cfg.models.serve == ()
    assert cfg.api == ApiSection()
    assert cfg.timing == TimingSection()
    assert cfg.source == tmp_path / "node.toml"


def test_data_dir_default_follows_name() -> None:
    cfg = parse_config({"node": {"name": "alpha"}})
    assert cfg.node.data_dir == Path.home() / ".local/share/meshllm/alpha"


def test_frozen_and_with_node(tmp_path: Path) -> None:
    cfg = default_config(data_dir=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.name = "x"  # type: ignore[misc]
    other = cfg.with_node(name="other", role="standby")
    assert other.node.name == "other" and other.node.role == "standby"
    assert other.node.data_dir == tmp_path
    assert cfg.node.name == "meshllm"
    # invariants hold for configs built in code too
    with pytest.raises(ConfigError, match=r"node\.name"):
        cfg.with_node(name="has space")
    with pytest.raises(ConfigError, match=r"timing\.dead_after_s"):
        dataclasses.replace(cfg, timing=TimingSection(probe_interval_s=5.0))


def test_nodeconfig_minimal_construction(tmp_path: Path) -> None:
    cfg = NodeConfig(node=NodeSection(name="n", data_dir=tmp_path))
    assert cfg.api.listen.port == 9337
    assert cfg.models.serve == ()


# ------------------------------------------------------------------------------------------- examples


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"solo.toml", "split-host.toml", "worker.toml", "client.toml", "standby.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.source == path
    text = path.read_text(encoding="utf-8")
    assert "meshllm invite --config" in text and "--role" in text and "mesh.invite" in text


def test_examples_content() -> None:
    by_name = {p.stem: load_config(p) for p in EXAMPLES}
    assert by_name["solo"].models.serve == ("smollm2-135m",)
    assert by_name["solo"].node.join == ()
    assert by_name["split-host"].models.force_split is True
    assert by_name["worker"].node.role == "active"
    assert by_name["worker"].node.join
    assert by_name["worker"].models.serve == by_name["split-host"].models.serve
    assert by_name["client"].node.role == "client"
    assert by_name["client"].models.serve == ()
    assert by_name["client"].node.join
    assert by_name["standby"].node.role == "standby"
    assert by_name["standby"].node.join
    assert by_name["standby"].node.vram_gb is not None


def test_examples_can_run_side_by_side() -> None:
    configs = [load_config(p) for p in EXAMPLES]
    ports = [c.api.listen.port for c in configs] + [c.console.listen.port for c in configs]
    assert len(set(ports)) == len(ports)
    quic = [c.node.quic_listen.port for c in configs]
    assert len(set(quic)) == len(quic)
    assert len({c.node.data_dir for c in configs}) == len(configs)
    assert len({c.node.name for c in configs}) == len(configs)


# ------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests_close_match() -> None:
    err = error_of({"node": {"nmae": "a"}})
    assert "node.nmae" in str(err)
    assert "did you mean node.name?" in str(err)
    assert err.key == "node.nmae"


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    err = error_of({"api": {"zzzz": 1}})
    assert "api.zzzz" in str(err)
    assert "listen" in str(err)


def test_unknown_section_suggests_close_match() -> None:
    err = error_of({"nodes": {"name": "a"}})
    assert "[nodes]" in str(err)
    assert "did you mean [node]?" in str(err)


def test_unknown_nested_table_in_section() -> None:
    err = error_of({"timing": {"extra": {}}})
    assert "timing.extra" in str(err)


def test_top_level_key_belongs_in_a_section() -> None:
    err = error_of({"role": "client"})
    assert "role" in str(err)
    assert "node.role" in str(err)


def test_section_must_be_a_table() -> None:
    err = error_of({"node": "x"})
    assert str(err).startswith("node:")


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nfromat = "json"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "log.fromat" in str(info.value)
    assert "did you mean log.format?" in str(info.value)
    assert info.value.key == "log.fromat"


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"node": {"name": 3}}, "node.name", "string"),
        ({"node": {"role": True}}, "node.role", "string"),
        ({"node": {"vram_gb": True}}, "node.vram_gb", "number"),
        ({"node": {"vram_gb": "8"}}, "node.vram_gb", "number"),
        ({"node": {"join": "token"}}, "node.join", "array"),
        ({"node": {"join": [1]}}, "node.join[0]", "string"),
        ({"node": {"advertise": "1.2.3.4:5"}}, "node.advertise", "array"),
        ({"node": {"data_dir": 5}}, "node.data_dir", "path"),
        ({"node": {"quic_listen": 9338}}, "node.quic_listen", "host:port"),
        ({"api": {"listen": 9337}}, "api.listen", "host:port"),
        ({"models": {"serve": "smollm2-135m"}}, "models.serve", "array"),
        ({"models": {"force_split": 1}}, "models.force_split", "boolean"),
        ({"models": {"force_split": "true"}}, "models.force_split", "boolean"),
        ({"log": {"file": "yes"}}, "log.file", "boolean"),
        ({"llama": {"bin_dir": ["a"]}}, "llama.bin_dir", "path"),
        ({"llama": {"tensor_cache": "no"}}, "llama.tensor_cache", "boolean"),
        ({"timing": {"gossip_interval_s": False}}, "timing.gossip_interval_s", "number"),
        ({"timing": {"dead_ttl_s": "60"}}, "timing.dead_ttl_s", "number"),
    ],
)
def test_wrong_types_name_key_and_type(data: dict[str, Any], key: str, expected: str) -> None:
    err = error_of(data)
    assert str(err).startswith(f"{key}:"), str(err)
    assert expected in str(err)
    assert err.key == key


def test_ints_accepted_for_floats() -> None:
    cfg = parse_config({"node": {"vram_gb": 8}, "timing": {"dead_ttl_s": 30}})
    assert cfg.node.vram_gb == 8.0 and isinstance(cfg.node.vram_gb, float)
    assert cfg.timing.dead_ttl_s == 30.0


# ------------------------------------------------------------------------------------------ bad values


def test_bad_role() -> None:
    err = error_of({"node": {"role": "x"}})
    assert str(err) == "node.role: must be one of active, client, standby (got 'x')"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node": {"name": ""}}, "node.name"),
        ({"node": {"name": "a b"}}, "node.name"),
        ({"node": {"name": "a\tb"}}, "node.name"),
        ({"node": {"name": "a/b"}}, "node.name"),
        ({"node": {"vram_gb": 0}}, "node.vram_gb"),
        ({"node": {"vram_gb": -1.5}}, "node.vram_gb"),
        ({"node": {"vram_gb": float("nan")}}, "node.vram_gb"),
        ({"node": {"join": [""]}}, "node.join[0]"),
        ({"node": {"join": ["ok", "   "]}}, "node.join[1]"),
        ({"node": {"data_dir": ""}}, "node.data_dir"),
        ({"node": {"advertise": ["0.0.0.0:9338"]}}, "node.advertise[0]"),
        ({"node": {"advertise": ["10.0.0.1:0"]}}, "node.advertise[0]"),
        ({"node": {"advertise": ["10.0.0.1:1", "nope"]}}, "node.advertise[1]"),
        ({"models": {"serve": [""]}}, "models.serve[0]"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"timing": {"probe_interval_s": 0}}, "timing.probe_interval_s"),
        ({"timing": {"route_refresh_s": -1}}, "timing.route_refresh_s"),
        ({"timing": {"dead_ttl_s": float("inf")}}, "timing.dead_ttl_s"),
        ({"timing": {"dead_after_s": 1.0}}, "timing.dead_after_s"),
        ({"timing": {"probe_interval_s": 4.0}}, "timing.dead_after_s"),
        ({"node": {"role": "client"}, "models": {"serve": ["m"]}}, "models.serve"),
        ({"console": {"listen": "127.0.0.1:9337"}}, "console.listen"),
    ],
)
def test_bad_values_name_key(data: dict[str, Any], key: str) -> None:
    err = error_of(data)
    assert str(err).startswith(f"{key}:"), str(err)
    assert err.key == key


def test_port_zero_everywhere_is_fine() -> None:
    cfg = parse_config(
        {
            "node": {"quic_listen": "127.0.0.1:0"},
            "api": {"listen": "127.0.0.1:0"},
            "console": {"listen": "127.0.0.1:0"},
        }
    )
    assert cfg.api.listen.port == cfg.console.listen.port == cfg.node.quic_listen.port == 0


def test_lists_are_tuples_and_tokens_stripped() -> None:
    cfg = parse_config(
        {
            "node": {"join": [" tok1 ", "tok2"], "advertise": ["10.0.0.1:9338", "[fe80::1]:9338"]},
            "models": {"serve": ["a", "b"]},
        }
    )
    assert cfg.node.join == ("tok1", "tok2")
    assert cfg.node.advertise == (HostPort("10.0.0.1", 9338), HostPort("fe80::1", 9338))
    assert cfg.models.serve == ("a", "b")


# ----------------------------------------------------------------------------------------- host:port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9337", HostPort("127.0.0.1", 9337)),
        ("[::1]:9000", HostPort("::1", 9000)),
        ("localhost:0", HostPort("localhost", 0)),
        ("0.0.0.0:65535", HostPort("0.0.0.0", 65535)),
        ("my-host.example.com:80", HostPort("my-host.example.com", 80)),
        ("  10.1.2.3:5  ", HostPort("10.1.2.3", 5)),
    ],
)
def test_hostport_parse_good(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text, "api.listen") == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("127.0.0.1", "missing port"),
        ("localhost:", "missing port"),
        ("[::1]", "missing port"),
        ("127.0.0.1:70000", "0..65535"),
        ("127.0.0.1:65536", "0..65535"),
        ("127.0.0.1:-1", "0..65535"),
        ("127.0.0.1:http", "0..65535"),
        ("127.0.0.1:1e3", "0..65535"),
        (":9337", "missing host"),
        ("::1:9000", "brackets"),
        ("[1.2.3.4]:80", "IPv6"),
        ("[::1:80", "]"),
        ("[zz::1]:80", "IPv6"),
        ("300.1.1.1:80", "IPv4"),
        ("bad host:80", "host"),
        ("http://x:80", "scheme"),
    ],
)
def test_hostport_parse_bad(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        HostPort.parse(text, "node.quic_listen")
    assert str(info.value).startswith("node.quic_listen:")
    assert fragment in str(info.value)
    assert info.value.key == "node.quic_listen"


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:70000", ""])
def test_bad_hostport_in_config_names_key(value: str) -> None:
    err = error_of({"api": {"listen": value}})
    assert str(err).startswith("api.listen:")


def test_hostport_str() -> None:
    assert str(HostPort("127.0.0.1", 9337)) == "127.0.0.1:9337"
    assert str(HostPort("::1", 9000)) == "[::1]:9000"
    assert HostPort("0.0.0.0", 1).is_wildcard and HostPort("::", 1).is_wildcard
    assert not HostPort("127.0.0.1", 1).is_wildcard


ports = st.integers(min_value=0, max_value=65535)
ip_hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
name_hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{1,10}){0,3}", fullmatch=True).filter(
    lambda h: not all(label.isdigit() for label in h.split("."))
)


@given(host=ip_hosts, port=ports)
def test_hostport_roundtrip_ip(host: str, port: int) -> None:
    hp = HostPort(host, port)
    text = str(hp)
    assert HostPort.parse(text, "api.listen") == hp
    assert str(HostPort.parse(text, "api.listen")) == text
    if ipaddress.ip_address(host).version == 6:
        assert text.startswith("[")


@given(host=name_hosts, port=ports)
def test_hostport_roundtrip_names(host: str, port: int) -> None:
    hp = HostPort(host, port)
    assert HostPort.parse(str(hp), "api.listen") == hp


@given(port=st.integers().filter(lambda p: p < 0 or p > 65535))
def test_hostport_out_of_range_ports_rejected(port: int) -> None:
    with pytest.raises(ConfigError, match=r"^api\.listen:"):
        HostPort.parse(f"127.0.0.1:{port}", "api.listen")


# ------------------------------------------------------------------------------------------------ paths


def test_relative_data_dir_resolves_against_config_folder(tmp_path: Path, monkeypatch: Any) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, '[node]\ndata_dir = "state/a"\n[llama]\nbin_dir = "../bin"\n')
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(path)
    assert cfg.node.data_dir == conf_dir / "state/a"
    assert cfg.llama.bin_dir == conf_dir / "../bin"


def test_relative_config_path_still_gives_absolute_paths(tmp_path: Path, monkeypatch: Any) -> None:
    write(tmp_path, '[node]\ndata_dir = "d"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("node.toml"))
    assert cfg.node.data_dir == tmp_path / "d"
    assert cfg.source == tmp_path / "node.toml"


def test_home_is_expanded(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config(
        {"node": {"data_dir": "~/x"}, "llama": {"bin_dir": "~/bin"}}, base_dir=Path("/elsewhere")
    )
    assert cfg.node.data_dir == tmp_path / "x"
    assert cfg.llama.bin_dir == tmp_path / "bin"


def test_absolute_paths_kept(tmp_path: Path) -> None:
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "abs")}}, base_dir=Path("/elsewhere"))
    assert cfg.node.data_dir == tmp_path / "abs"


def test_parse_config_without_base_dir_uses_cwd(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_config({"node": {"data_dir": "rel"}}).node.data_dir == tmp_path / "rel"


# ---------------------------------------------------------------------------------------- file errors


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\nrole = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_invalid_utf8_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_validation_error_from_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nrole = "boss"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "node.role: must be one of active, client, standby (got 'boss')" in str(info.value)
    assert info.value.key == "node.role"


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
