"""BackgroundSha256: the digest of the pieces in order, whatever their sizes, a resumed digest carried
on, and the hashing thread gone after the block, also when the download fails."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.models.digest import BackgroundSha256


def sha256_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sha256"]


@given(st.lists(st.binary(max_size=9000), max_size=40))
def test_the_digest_is_hashlibs_over_the_pieces_in_order(pieces: list[bytes]) -> None:
    with BackgroundSha256() as hashing:
        for piece in pieces:
            hashing.update(piece)
        assert hashing.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_resumed_download_carries_the_digest_of_the_bytes_already_there() -> None:
    head, tail = b"a" * 5000, b"b" * 70000
    resumed = hashlib.sha256(head)
    with BackgroundSha256(resumed) as hashing:
        hashing.update(tail)
    assert resumed.hexdigest() == hashlib.sha256(head + tail).hexdigest()


def test_the_thread_ends_with_the_block_when_the_download_fails() -> None:
    before = len(sha256_threads())
    with pytest.raises(ConnectionError), BackgroundSha256() as hashing:
        hashing.update(b"x" * 10000)
        raise ConnectionError("cut")
    assert len(sha256_threads()) == before
    with pytest.raises(ValueError):
        hashing.update(b"late")
