"""SecAgg+ state machines (Bonawitz et al. 2017; Bell et al. 2020) on Flower's primitives.

No Flower runtime here: the server and each client exchange plain payload dicts
(ints, bytes, lists, numpy arrays); :mod:`server.secagg` and :mod:`client.secagg`
carry them in Flower messages.

Stages (U0 ⊇ U1 ⊇ U2 ⊇ U3 ⊇ U4: the nodes still answering after each stage)

1. ``setup``: the server sends the parameters and the sampled nodes U0; each node
   makes two ECDH key pairs (SECP384R1, Flower's ``generate_key_pairs``): (sk1, pk1)
   for pairwise masks, (sk2, pk2) for encrypting shares; replies pk1, pk2 → U1.
2. ``share-keys``: the server broadcasts U1's public keys; each node draws its
   self-mask seed b (32 bytes of ``os.urandom``), splits b and sk1 into |U1| Shamir
   shares with threshold t (Flower's ``create_shares``), encrypts the share meant for
   v with the key agreed from (sk2, pk2_v) (Flower's ``generate_shared_key`` +
   ``encrypt``, Fernet) and replies the ciphertexts → U2.
3. ``collect``: the server forwards to each node the ciphertexts addressed to it by
   U2; the node decrypts and stores the shares, quantises its vector x with its
   zero-sum dither (see :mod:`common.secagg.quantize`) and replies
   ``y = ⌊x/Δ + Σ_v ±D(s_uv) + ½⌋ + PRG(b) + Σ_{v ∈ U2, v ≠ u} ±PRG(s_uv) mod M``
   (sign + if u > v) → U3.
4. ``unmask``: the server names the survivors U3 and the dropped U2 \\ U3; each node
   replies its share of b for every survivor and of sk1 for every dropped node (never
   both for one node) → U4. The server reconstructs each survivor's b and each dropped
   node's sk1 (t shares each), removes the self masks and the dropped nodes' pairwise
   masks and the dropped nodes' dithers from the survivors' vectors, and decodes the
   sum of U3's vectors.

Graph: complete (every node is every other's neighbour). With ≤ 20 silos the O(n²)
key agreements cost milliseconds; SecAgg+'s k-regular graph only pays off for
hundreds of clients, and its security then holds per neighbourhood.

Threshold t (default ⌊n/2⌋ + 1, at least 2): any stage with fewer than t answering
nodes aborts with :class:`SecAggError` and no sum; so up to n − t nodes may drop in
all. A majority threshold also means the shares of b and of sk1 for one node can never
both reach t from disjoint honest answers.

PRG: AES-256 in counter mode over a key derived with SHA-256 from the seed (the
ECDH secret s_uv or b) and the round; its 32-bit words are exactly uniform in Z_{2^32}.
The dither D(s_uv) is a second stream of the same ECDH secret under its own label: its
uint32 words divided by 2^32, uniform on [0, 1) at 2^−32 resolution.
Flower's ``pseudo_rand_gen`` is not used: it folds the seed to 32 bits
(``np.random.RandomState``), which a server could search exhaustively, and draws from
[0, M − 2].
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.secagg.quantize import QuantisationError, QuantSpec, dequantise_sum, quantise

SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
GRAPH = "complete"


class SecAggError(RuntimeError):
    """The protocol cannot produce a correct sum (names the stage and the counts); no sum is released."""


def default_threshold(num_nodes: int) -> int:
    """t = ⌊n/2⌋ + 1, at least 2: a strict majority of the sampled nodes."""
    return max(2, num_nodes // 2 + 1)


@dataclass(frozen=True, slots=True)
class SecAggParams:
    """One secure sum: round, threshold t, quantisation, vector length, sampled nodes U0."""

    server_round: int
    threshold: int
    quant: QuantSpec
    vector_length: int
    nodes: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if len(set(self.nodes)) != n:
            raise SecAggError(f"nodes: duplicate node ids in {list(self.nodes)}")
        if n < 2:
            raise SecAggError(f"nodes: secure aggregation needs at least 2 nodes, got {n}")
        if n > self.quant.max_silos:
            raise SecAggError(f"nodes: {n} nodes but the quantisation admits at most {self.quant.max_silos}")
        if not 2 <= self.threshold <= n:
            raise SecAggError(f"threshold: must be in 2..{n} (the number of nodes), got {self.threshold}")
        if self.vector_length < 1:
            raise SecAggError(f"vector_length: must be >= 1, got {self.vector_length}")

    def to_payload(self) -> dict[str, Any]:
        return {
            "round": self.server_round,
            "threshold": self.threshold,
            "clip-range": self.quant.clip_range,
            "modulus-bits": self.quant.modulus_bits,
            "max-silos": self.quant.max_silos,
            "vector-length": self.vector_length,
            "nodes": list(self.nodes),
        }

    @classmethod
    def from_payload(cls, p: Mapping[str, Any]) -> SecAggParams:
        try:
            return cls(
                server_round=int(p["round"]),
                threshold=int(p["threshold"]),
                quant=QuantSpec(float(p["clip-range"]), int(p["modulus-bits"]), int(p["max-silos"])),
                vector_length=int(p["vector-length"]),
                nodes=tuple(int(n) for n in p["nodes"]),
            )
        except KeyError as exc:
            raise SecAggError(f"setup: parameter {exc.args[0]!r} missing") from None


# ------------------------------------------------------------------ masks
def _mask_key(kind: bytes, server_round: int, seed: bytes) -> bytes:
    return hashlib.sha256(b"fedrec-secagg/" + kind + b"/" + str(server_round).encode() + b"/" + seed).digest()


def prg(key: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """``length`` uniform words of ``dtype`` from AES-256-CTR keyed by ``key`` (32 bytes)."""
    little = np.dtype(dtype).newbyteorder("<")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(length * little.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=little).astype(dtype)


def self_mask(seed: bytes, params: SecAggParams) -> np.ndarray:
    """PRG(b) of a node's self-mask seed b."""
    return prg(_mask_key(b"self", params.server_round, seed), params.vector_length, params.quant.dtype)


def pairwise_streams(sk1: bytes, pk1_other: bytes, params: SecAggParams) -> tuple[np.ndarray, np.ndarray]:
    """(PRG(s_uv), D(s_uv)) from the ECDH secret s_uv of (sk1_u, pk1_v), symmetric in u, v.

    PRG(s_uv) is the pair's mask in Z_M. D(s_uv), the pair's dither, is uniform on [0, 1) in
    steps of 2^−32, from a second stream under its own label. Node u adds +D if u > v, −D
    otherwise, so the dithers of any set of nodes that masked with each other sum to exactly
    0 (multiples of 2^−32 add exactly in float64).
    """
    agreed = base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1_other)))
    mask = prg(_mask_key(b"pair", params.server_round, agreed), params.vector_length, params.quant.dtype)
    words = prg(_mask_key(b"dither", params.server_round, agreed), params.vector_length, np.uint32)
    return mask, words.astype(np.float64) * 2.0**-32


# ------------------------------------------------------------------ client
@dataclass
class ClientProtocol:
    """One node's side of one secure sum; :meth:`to_state`/:meth:`from_state` keep it between messages."""

    node_id: int
    stage: str = ""
    params: SecAggParams | None = None
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of owner's b
    key_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of owner's sk1
    peers: list[int] = field(default_factory=list)  # U2 \ {me}: the nodes I masked with
    beyond: int = 0  # coordinates of my vector beyond ±r (kept here, never sent)

    def _expect(self, stage: str, payload: Mapping[str, Any]) -> SecAggParams:
        previous = STAGES[STAGES.index(stage) - 1]
        if self.stage != previous or self.params is None:
            raise SecAggError(
                f"{stage}: node {self.node_id} is at stage {self.stage or 'none'!r}, expected {previous!r}"
            )
        if int(payload.get("round", -1)) != self.params.server_round:
            raise SecAggError(
                f"{stage}: message of round {payload.get('round')} but node {self.node_id} runs round "
                f"{self.params.server_round}"
            )
        return self.params

    # stage 1
    def setup(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        params = SecAggParams.from_payload(payload)
        if self.node_id not in params.nodes:
            raise SecAggError(f"setup: node {self.node_id} is not among the sampled nodes {list(params.nodes)}")
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        fresh = ClientProtocol(self.node_id, stage=SETUP, params=params)
        fresh.sk1, fresh.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        fresh.sk2, fresh.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        self.__dict__.update(fresh.__dict__)
        return {"round": params.server_round, "pk1": self.pk1, "pk2": self.pk2}

    # stage 2
    def share_keys(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        params = self._expect(SHARE_KEYS, payload)
        ids = [int(n) for n in payload["ids"]]
        keys = dict(zip(ids, zip(payload["pk1"], payload["pk2"], strict=True), strict=True))
        if len(keys) < params.threshold:
            raise SecAggError(f"share-keys: {len(keys)} nodes left, fewer than the threshold {params.threshold}")
        if not set(keys) <= set(params.nodes):
            raise SecAggError(f"share-keys: nodes {sorted(set(keys) - set(params.nodes))} were not sampled")
        if keys.get(self.node_id) != (self.pk1, self.pk2):
            raise SecAggError(f"share-keys: the server relayed wrong public keys for node {self.node_id}")
        all_keys = [k for pair in keys.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError("share-keys: some public keys are identical")
        self.public_keys = keys
        self.seed = os.urandom(32)
        order = sorted(keys)
        seed_shares = create_shares(self.seed, params.threshold, len(order))
        key_shares = create_shares(self.sk1, params.threshold, len(order))
        dsts, ctxts = [], []
        for node, b_share, sk_share in zip(order, seed_shares, key_shares, strict=True):
            if node == self.node_id:
                self.seed_shares[node], self.key_shares[node] = b_share, sk_share
                continue
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(keys[node][1]))
            dsts.append(node)
            ctxts.append(encrypt(key, share_keys_plaintext_concat(self.node_id, node, b_share, sk_share)))
        self.stage = SHARE_KEYS
        return {"round": params.server_round, "dsts": dsts, "ctxts": ctxts}

    # stage 3
    def collect(self, payload: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
        params = self._expect(COLLECT, payload)
        srcs = [int(n) for n in payload["srcs"]]
        if len(srcs) + 1 < params.threshold:
            raise SecAggError(f"collect: {len(srcs) + 1} nodes left, fewer than the threshold {params.threshold}")
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.size != params.vector_length:
            raise SecAggError(
                f"collect: node {self.node_id}'s vector has shape {vector.shape}, expected ({params.vector_length},)"
            )
        for src, ctxt in zip(srcs, payload["ctxts"], strict=True):
            if src not in self.public_keys or src == self.node_id:
                raise SecAggError(f"collect: share from node {src}, which did not share keys with node {self.node_id}")
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(self.public_keys[src][1]))
            actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ctxt))
            if (actual_src, dst) != (src, self.node_id):
                raise SecAggError(f"collect: ciphertext says {actual_src} -> {dst}, relayed as {src} -> {self.node_id}")
            self.seed_shares[src], self.key_shares[src] = b_share, sk_share
        streams = {other: pairwise_streams(self.sk1, self.public_keys[other][0], params) for other in srcs}
        dither = np.zeros(params.vector_length)
        for other, (_, d) in streams.items():
            dither = dither + d if self.node_id > other else dither - d
        try:
            q = quantise(vector, params.quant, dither)
        except QuantisationError as exc:
            raise SecAggError(f"collect: node {self.node_id}: {exc}") from None
        self.beyond = q.beyond
        masked = q.values + self_mask(self.seed, params)
        for other, (m, _) in streams.items():
            masked = masked + m if self.node_id > other else masked - m  # uint wrap-around: mod M
        self.peers = srcs
        self.stage = COLLECT
        return {"round": params.server_round, "masked": masked}

    # stage 4
    def unmask(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        params = self._expect(UNMASK, payload)
        alive = [int(n) for n in payload["alive"]]
        dropped = [int(n) for n in payload["dropped"]]
        known = {*self.peers, self.node_id}
        if set(alive) & set(dropped):
            raise SecAggError(f"unmask: nodes {sorted(set(alive) & set(dropped))} named both alive and dropped")
        if self.node_id not in alive or not set(alive) | set(dropped) <= known:
            raise SecAggError(f"unmask: survivors/dropped {alive}/{dropped} do not match node {self.node_id}'s peers")
        if len(alive) < params.threshold:
            raise SecAggError(f"unmask: {len(alive)} survivors, fewer than the threshold {params.threshold}")
        ids = alive + dropped
        shares = [self.seed_shares[n] for n in alive] + [self.key_shares[n] for n in dropped]
        self.stage = UNMASK
        return {"round": params.server_round, "ids": ids, "shares": shares}

    # state
    def to_state(self) -> dict[str, Any]:
        """A flat dict of ints, bytes, strings and lists (fits a Flower ConfigRecord)."""
        p = self.params
        return {
            "node-id": self.node_id,
            "stage": self.stage,
            **({f"param.{k}": v for k, v in p.to_payload().items()} if p is not None else {}),
            "sk1": self.sk1, "pk1": self.pk1, "sk2": self.sk2, "pk2": self.pk2, "seed": self.seed,
            "keys.ids": list(self.public_keys), "keys.pk1": [v[0] for v in self.public_keys.values()],
            "keys.pk2": [v[1] for v in self.public_keys.values()],
            "seed-shares.ids": list(self.seed_shares), "seed-shares": list(self.seed_shares.values()),
            "key-shares.ids": list(self.key_shares), "key-shares": list(self.key_shares.values()),
            "peers": list(self.peers),
            "beyond": self.beyond,
        }  # fmt: skip

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> ClientProtocol:
        param_fields = {k[len("param.") :]: v for k, v in s.items() if k.startswith("param.")}
        return cls(
            node_id=int(s["node-id"]),
            stage=str(s["stage"]),
            params=SecAggParams.from_payload(param_fields) if param_fields else None,
            sk1=s["sk1"], pk1=s["pk1"], sk2=s["sk2"], pk2=s["pk2"], seed=s["seed"],
            public_keys=dict(zip(s["keys.ids"], zip(s["keys.pk1"], s["keys.pk2"], strict=True), strict=True)),
            seed_shares=dict(zip(s["seed-shares.ids"], s["seed-shares"], strict=True)),
            key_shares=dict(zip(s["key-shares.ids"], s["key-shares"], strict=True)),
            peers=list(s["peers"]),
            beyond=int(s["beyond"]),
        )  # fmt: skip


# ------------------------------------------------------------------ server
@dataclass(frozen=True, slots=True)
class SecAggOutcome:
    """The decoded sum of the survivors' vectors and who answered at each stage."""

    total: np.ndarray  # float64, sum of the survivors' vectors within error_bound
    survivors: tuple[int, ...]  # U3: whose vectors are in the sum
    dropped: dict[str, tuple[int, ...]]  # stage -> nodes that stopped answering at that stage
    error_bound: float  # strict per-coordinate bound on |total − Σ vectors|


class ServerProtocol:
    """The server's side of one secure sum; feed it each stage's replies in order."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.stage = ""
        self.active: list[int] = sorted(params.nodes)
        self.dropped: dict[str, tuple[int, ...]] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self._routed: dict[int, tuple[list[int], list[bytes]]] = {}
        self._alive_before_collect: list[int] = []
        self._sum: np.ndarray | None = None

    def _check_stage(self, stage: str) -> None:
        expected = STAGES[STAGES.index(stage) - 1] if stage != SETUP else ""
        if self.stage != expected:
            raise SecAggError(f"{stage}: the server is at stage {self.stage or 'none'!r}, expected {expected!r}")

    def _advance(self, stage: str, answered: Sequence[int]) -> None:
        self._check_stage(stage)
        unknown = sorted(set(answered) - set(self.active))
        if unknown:
            raise SecAggError(f"{stage}: replies from nodes {unknown}, which were not asked")
        self.dropped[stage] = tuple(n for n in self.active if n not in set(answered))
        self.active = sorted(answered)
        self.stage = stage
        if len(self.active) < self.params.threshold:
            raise SecAggError(
                f"{stage}: {len(self.active)} of {len(self.params.nodes)} nodes answered, fewer than the threshold "
                f"{self.params.threshold}; dropped so far {self._all_dropped()}; no sum is released"
            )

    def _all_dropped(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.dropped.items() if v}

    def _payload(self, **extra: Any) -> dict[str, Any]:
        return {"round": self.params.server_round, **extra}

    # stage 1
    def setup_payload(self) -> dict[str, Any]:
        return self.params.to_payload()

    def receive_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        self._advance(SETUP, list(replies))
        self.keys = {n: (bytes(r["pk1"]), bytes(r["pk2"])) for n, r in replies.items()}

    # stage 2
    def share_keys_payloads(self) -> dict[int, dict[str, Any]]:
        ids = sorted(self.keys)
        payload = self._payload(ids=ids, pk1=[self.keys[n][0] for n in ids], pk2=[self.keys[n][1] for n in ids])
        return dict.fromkeys(self.active, payload)

    def receive_shares(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        self._advance(SHARE_KEYS, list(replies))
        alive = set(self.active)
        self._routed = {n: ([], []) for n in self.active}
        for src in sorted(replies):
            for dst, ctxt in zip(replies[src]["dsts"], replies[src]["ctxts"], strict=True):
                if int(dst) in alive:
                    self._routed[int(dst)][0].append(src)
                    self._routed[int(dst)][1].append(ctxt)

    # stage 3
    def collect_payloads(self) -> dict[int, dict[str, Any]]:
        return {n: self._payload(srcs=self._routed[n][0], ctxts=self._routed[n][1]) for n in self.active}

    def receive_masked(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        self._check_stage(COLLECT)
        self._alive_before_collect = list(self.active)
        p = self.params
        total = np.zeros(p.vector_length, dtype=p.quant.dtype)
        for node, reply in replies.items():
            masked = np.asarray(reply["masked"])
            if masked.dtype != p.quant.dtype or masked.shape != (p.vector_length,):
                raise SecAggError(
                    f"collect: node {node} sent a {masked.dtype.name}{list(masked.shape)} vector, expected "
                    f"{np.dtype(p.quant.dtype).name}[{p.vector_length}]"
                )
            total += masked
        self._advance(COLLECT, list(replies))
        self._routed.clear()
        self._sum = total

    # stage 4
    def unmask_payloads(self) -> dict[int, dict[str, Any]]:
        dropped = [n for n in self._alive_before_collect if n not in set(self.active)]
        return {n: self._payload(alive=list(self.active), dropped=dropped) for n in self.active}

    def receive_unmask(self, replies: Mapping[int, Mapping[str, Any]]) -> SecAggOutcome:
        survivors = list(self.active)  # U3: whose masked vectors are in the sum
        dead = [n for n in self._alive_before_collect if n not in set(survivors)]
        self._advance(UNMASK, list(replies))
        shares: dict[int, list[bytes]] = {n: [] for n in survivors + dead}
        for node in sorted(replies):
            for owner, share in zip(replies[node]["ids"], replies[node]["shares"], strict=True):
                if int(owner) not in shares:
                    raise SecAggError(f"unmask: node {node} sent a share of node {owner}, which was not asked for")
                shares[int(owner)].append(bytes(share))
        t, p = self.params.threshold, self.params
        short = {n: len(s) for n, s in shares.items() if len(s) < t}
        if short:
            raise SecAggError(f"unmask: fewer than t = {t} shares for nodes {short}; no sum is released")
        if self._sum is None:
            raise SecAggError("unmask: no masked vectors were collected")
        total = self._sum
        known_dither = np.zeros(p.vector_length)  # the dead nodes' pairs: in the survivors' dithers, not cancelled
        for node in survivors:
            total = total - self_mask(_combine(shares[node][:t], node, "seed"), p)
        for node in dead:
            sk1 = _combine(shares[node][:t], node, "sk1")
            for other in survivors:
                m, d = pairwise_streams(sk1, self.keys[other][0], p)
                total = total - m if other > node else total + m  # undo the survivor's ±PRG(s_other,node)
                known_dither = known_dither + d if other > node else known_dither - d
        self._sum = None
        try:
            outcome = dequantise_sum(total, p.quant, len(survivors), known_dither)
        except QuantisationError as exc:
            raise SecAggError(f"unmask: {exc}; no sum is released") from None
        return SecAggOutcome(
            total=outcome,
            survivors=tuple(survivors),
            dropped={k: v for k, v in self.dropped.items() if v},
            error_bound=p.quant.sum_error_bound(len(survivors)),
        )


def _combine(shares: list[bytes], owner: int, what: str) -> bytes:
    try:
        return combine_shares(shares)
    except ValueError as exc:
        raise SecAggError(f"unmask: the shares of node {owner}'s {what} do not combine: {exc}") from None
