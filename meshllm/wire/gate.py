"""The gate: what one node admits - its mesh's authority, the nodes it remembers, what is revoked.

Why a stateful object beside the pure checks: both listeners (QUIC and the TLS fast path) and the
dialling side must agree on one memory of admitted node keys and one revocation list, and both must
survive restarts. Files in the data dir (0600): ``admitted.jsonl`` (one line per node key admitted,
with its grant's role and token id: a node admitted once keeps its place when its invite expires;
appended, not rewritten, so thousands of passive clients cost one short write each) and
``revocations.json`` (signed revocations, re-checked when loaded).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from meshllm.wire.admission import Admitted, AuthError, admit, answer_hello, make_hello, verify_answer
from meshllm.wire.codec import CodecError, decode_as, encode
from meshllm.wire.grants import GrantError, check_revocation, sign_revocation
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import MeshMembership, write_private
from meshllm.wire.messages import Grant, Hello, Revocation

ADMITTED_FILE = "admitted.jsonl"
REVOKED_FILE = "revocations.json"


class Gate:
    """Admission state of one node; safe to use from the loop thread and the node's threads."""

    def __init__(
        self,
        data_dir: Path | None,
        membership: MeshMembership,
        identity: NodeIdentity,
        grant: Grant | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.membership = membership
        self.identity = identity
        self.grant = grant
        self.clock = clock
        self._lock = threading.Lock()
        self._admitted: dict[str, dict[str, str]] = {}
        self._revoked: dict[str, Revocation] = {}
        if data_dir is not None:
            self._load(data_dir)

    @property
    def mesh_id(self) -> str:
        return self.membership.mesh_id

    # -- Hellos ---------------------------------------------------------------------------------------

    def hello(self, role: str, target: str) -> Hello:
        """Our Hello to ``target``, with our grant."""
        if self.grant is None:
            raise AuthError("this node has no grant: join the mesh with an invite token")
        return make_hello(self.identity, self.mesh_id, self.grant, role, target)

    def admit(self, hello: Hello) -> Admitted:
        """Admit a dialler's Hello (AuthError says why not) and remember its key."""
        admitted = admit(
            hello,
            self.mesh_id,
            self.membership.authority,
            self.identity.node_id,
            self.clock(),
            self.remembers,
            self.revoked_reason,
        )
        self._remember(admitted)
        return admitted

    def answer(self, hello: Hello, role: str) -> Hello:
        return answer_hello(self.identity, self.mesh_id, role, hello)

    def check_answer(self, answer: Hello, sent: Hello, expected_node: str) -> None:
        verify_answer(answer, self.mesh_id, self.identity.node_id, expected_node, sent)
        reason = self.revoked_reason(answer.node_id, "")
        if reason:
            raise AuthError(reason)

    # -- memory of admitted keys ----------------------------------------------------------------------

    def remembers(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._admitted

    def _remember(self, admitted: Admitted) -> None:
        entry = {"role": admitted.grant_role, "token_id": admitted.token_id}
        with self._lock:
            if self._admitted.get(admitted.node_id) == entry:
                return
            self._admitted[admitted.node_id] = entry
            if self.data_dir is not None:
                line = json.dumps({"node_id": admitted.node_id, **entry}) + "\n"
                fd = os.open(self.data_dir / ADMITTED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(line)

    # -- revocation -----------------------------------------------------------------------------------

    def revoked_reason(self, node_id: str, token_id: str) -> str:
        """Why this node (or token) is revoked; "" when it is not. A node admitted with a token that
        is now revoked is revoked too."""
        with self._lock:
            if node_id in self._revoked:
                return f"node {node_id} is revoked"
            if token_id and token_id in self._revoked:
                return f"invite token {token_id} is revoked"
            remembered = self._admitted.get(node_id, {}).get("token_id", "")
            if remembered and remembered in self._revoked:
                return f"node {node_id} joined with revoked token {remembered}"
        return ""

    def nodes_of(self, target: str) -> set[str]:
        """The node ids a revocation of ``target`` cuts off, as far as this node knows."""
        with self._lock:
            return {target} | {n for n, e in self._admitted.items() if e.get("token_id") == target}

    def revocations(self) -> tuple[Revocation, ...]:
        with self._lock:
            return tuple(self._revoked.values())

    def sign(self, target: str) -> Revocation:
        """A revocation of ``target`` signed with the authority key (this node must hold the secret)."""
        try:
            return sign_revocation(self.membership.secret, self.mesh_id, target, self.clock())
        except GrantError as exc:
            raise AuthError(str(exc)) from None

    def apply(self, revocations: tuple[Revocation, ...]) -> tuple[tuple[Revocation, ...], tuple[str, ...]]:
        """Check and keep revocations; returns the new ones and why each other one was refused."""
        new: list[Revocation] = []
        refused: list[str] = []
        for rev in revocations:
            try:
                check_revocation(rev, self.membership.authority, self.mesh_id)
            except GrantError as exc:
                refused.append(str(exc))
                continue
            with self._lock:
                if rev.target in self._revoked:
                    continue
                self._revoked[rev.target] = rev
            new.append(rev)
        new.extend(self._cascade(new))
        if new and self.data_dir is not None:
            body = json.dumps({"revocations": [encode(r).hex() for r in self.revocations()]})
            write_private(self.data_dir / REVOKED_FILE, body)
        return tuple(new), tuple(refused)

    def _cascade(self, new: list[Revocation]) -> list[Revocation]:
        """Revocations of the nodes this node admitted with a token just revoked, signed here when
        this node holds the secret: only the nodes that admitted a node know which token it used,
        and the rest of the mesh must cut it off too."""
        if not self.membership.secret:
            return []
        extra: list[Revocation] = []
        for rev in new:
            for node_id in sorted(self.nodes_of(rev.target) - {rev.target}):
                with self._lock:
                    if node_id in self._revoked:
                        continue
                    signed = sign_revocation(self.membership.secret, self.mesh_id, node_id, self.clock())
                    self._revoked[node_id] = signed
                extra.append(signed)
        return extra

    def _load(self, data_dir: Path) -> None:
        try:
            lines = (data_dir / ADMITTED_FILE).read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:  # the last line for a node wins; a torn last line is skipped
            try:
                entry = json.loads(line)
                node_id = str(entry["node_id"])
                self._admitted[node_id] = {"role": str(entry["role"]), "token_id": str(entry["token_id"])}
            except (ValueError, KeyError, TypeError):
                continue
        try:
            stored = json.loads((data_dir / REVOKED_FILE).read_text())["revocations"]
            revs = tuple(decode_as(bytes.fromhex(h), Revocation) for h in stored)
        except (OSError, ValueError, KeyError, TypeError, CodecError):
            return
        for rev in revs:
            try:
                check_revocation(rev, self.membership.authority, self.mesh_id)
            except GrantError:
                continue
            self._revoked[rev.target] = rev
