"""A sha256 computed on its own thread while a download goes on.

Every byte of a model is checked against the hub's sha256 before it is used, and on a fast link the
hash is the slowest part of the receive loop: OpenSSL's sha256 runs at ~1.8 GB/s per core here, while
receiving and writing a piece costs about a third of that per byte (bench_download). Hashed inline,
the receiving thread does both and the download runs at the rate of the two together; hashed here,
the receiving thread only hands the piece over, and ``hashlib`` releases the GIL while it hashes
pieces of more than 2 KiB, so on a machine with a core to spare the hash costs no time at all.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType

PIECES_IN_FLIGHT = 16  # with 1 MiB reads: at most ~16 MiB waiting to be hashed


class BackgroundSha256:
    """``update`` hands a piece to a hashing thread and returns; ``hexdigest`` waits for the rest.

    Use it as a context manager: the thread ends when the block does, whether the download finished
    or failed. The pieces must not change once handed over (``bytes``, as socket reads return).
    """

    def __init__(self, initial: hashlib._Hash | None = None) -> None:
        self._digest = initial if initial is not None else hashlib.sha256()
        self._pieces: queue.Queue[bytes | None] = queue.Queue(PIECES_IN_FLIGHT)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            self._digest.update(piece)

    def update(self, piece: bytes) -> None:
        if self._closed:
            raise ValueError("update after hexdigest or close")
        self._pieces.put(piece)

    def close(self) -> None:
        """Stop the thread after the pieces already handed over; idempotent."""
        if not self._closed:
            self._closed = True
            self._pieces.put(None)
        self._thread.join()

    def hexdigest(self) -> str:
        """The sha256 of everything handed over (then no more pieces are taken)."""
        self.close()
        return self._digest.hexdigest()

    def __enter__(self) -> BackgroundSha256:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
