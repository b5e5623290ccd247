"""One round attempt of secure aggregation (Bonawitz et al. 2017, the semi-honest protocol with dropouts), as pure
state machines: values in, values out, SecAggError (one line) for anything the protocol cannot use.

The parties and the order (docs/PROTOCOL.md, Secure aggregation, gives the messages):

1. Each chosen trainer makes a `Trainer`: two fresh X25519 key pairs (one to encrypt shares, one to agree masks) and
   a fresh self-mask seed b, and publishes its `Advertisement` (the two public keys, a SHA-256 commitment to b).
2. The controller fixes the `Roster` (U1: the advertisements it got, the threshold t, the attempt's context).
3. Each trainer of U1 Shamir-shares (t of |U1|) its seed b and its mask private key among U1 (holder x = its
   1-based place in the roster, by peer id) and encrypts each other member's pair of shares to it
   (`Trainer.share`); each member decrypts the ones addressed to it (`Trainer.receive`).
4. The controller names the maskers (U2, a subset of U1 of at least t, whose shares went out). Each masker sends
   `Trainer.mask(encoded)`: its quantized update (`quantize.Quantizer.encode`) plus PRG(b) plus, for every other
   masker v, +PRG(s_uv) if u < v and -PRG(s_uv) if u > v (s_uv: the X25519 agreement of u's and v's mask keys, so
   the pairwise masks cancel in the sum), all modulo 2^32.
5. The controller (`Unmasker`) takes the masked vectors that come (U3, the survivors), then asks every survivor once
   for b's shares of the survivors and mask-key shares of the dropped (U2 \\ U3): never both of one trainer
   (`Unmasker.close`, `Trainer.reveal`). From t shares of each it rebuilds the seeds and the dropped trainers' keys,
   each checked against what its owner published first (a lying holder is named, not believed), removes PRG(b_u)
   for every survivor and the dropped trainers' pairwise masks from the survivors' vectors, and has the sum
   (`Unmasker.total`).

What the controller sees of a survivor u is x_u + PRG(b_u) + sum of +-PRG(s_uv): uniform modulo 2^32 whatever x_u
is, as long as one other masker's pairwise mask with u stays unknown to it; what it rebuilds only removes masks from
the sum. A trainer answers one request per attempt: asked again with another split of the maskers, it refuses, so
the controller cannot have both a trainer's seed (from one request) and its key (from another), which would unmask
that trainer's vector alone. Against a controller that asks different trainers different splits, t > n/2 is what
keeps two disjoint groups of t holders from existing (`minimum_threshold`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from peer.learning.secagg import crypto
from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.shamir import PRIME, SHARE_BYTES, Entropy, recover, share_bytes, share_from_bytes, split

MIN_TRAINERS = 2  # with one trainer the sum is its update: secure aggregation has nothing to hide it in
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + crypto.TAG_BYTES  # a seed share and a key share, encrypted: 80 bytes


def minimum_threshold(trainers: int) -> int:
    """The least t for n trainers: more than half, so no two disjoint groups of t holders exist (a controller that
    told one group a trainer survived and the other that it dropped would otherwise get both of its secrets)."""
    return trainers // 2 + 1


def _bind(*parts: bytes | str) -> bytes:
    """An unambiguous byte string of several parts (each length-prefixed): for HKDF info and AEAD associated data."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


@dataclass(frozen=True)
class Advertisement:
    """What a trainer publishes first: its public keys for this attempt and its commitment to the self-mask seed."""

    peer: str
    share_key: bytes  # X25519 public key: the others encrypt its shares with it
    mask_key: bytes  # X25519 public key: the pairwise masks are agreed with it
    seed_digest: bytes  # crypto.commitment(seed, context)

    def __post_init__(self):
        for name in ("share_key", "mask_key", "seed_digest"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != crypto.KEY_BYTES:
                raise SecAggError(f"{self.peer}'s {name.replace('_', ' ')} is not {crypto.KEY_BYTES} bytes")


@dataclass(frozen=True)
class Roster:
    """U1 of an attempt: the trainers (sorted by peer id) whose advertisements the controller took, the threshold,
    and the attempt's context (run, term, round, attempt: every key and share is bound to it)."""

    context: bytes
    threshold: int
    members: tuple[Advertisement, ...]

    def __post_init__(self):
        n = len(self.members)
        peers = [m.peer for m in self.members]
        if n < MIN_TRAINERS:
            raise SecAggError(f"secure aggregation needs at least {MIN_TRAINERS} trainers, got {n}")
        if peers != sorted(set(peers)):
            raise SecAggError("a roster lists each trainer once, in order of peer id")
        keys = [k for m in self.members for k in (m.share_key, m.mask_key)]
        if len(set(keys)) != len(keys):
            raise SecAggError("two public keys of a roster are the same")
        if isinstance(self.threshold, bool) or not minimum_threshold(n) <= self.threshold <= n:
            raise SecAggError(f"threshold {self.threshold} for {n} trainers: expected {minimum_threshold(n)} to {n}")

    @classmethod
    def of(cls, context: bytes, threshold: int, advertisements: Iterable[Advertisement]) -> Roster:
        return cls(context, threshold, tuple(sorted(advertisements, key=lambda a: a.peer)))

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(m.peer for m in self.members)

    def x(self, peer: str) -> int:
        """The peer's Shamir x-coordinate: its 1-based place in the roster."""
        return self.peers.index(peer) + 1

    def member(self, peer: str) -> Advertisement:
        for m in self.members:
            if m.peer == peer:
                return m
        raise SecAggError(f"{peer} is not in the roster")

    def check_maskers(self, maskers: Iterable[str]) -> tuple[str, ...]:
        """U2 as a sorted tuple, if it is a set of at least t roster members; SecAggError otherwise."""
        chosen = tuple(sorted(set(maskers)))
        if not set(chosen) <= set(self.peers):
            raise SecAggError(f"maskers {sorted(set(chosen) - set(self.peers))} are not in the roster")
        if len(chosen) < self.threshold:
            raise SecAggError(f"{len(chosen)} maskers, fewer than the threshold {self.threshold}")
        return chosen


@dataclass(frozen=True)
class UnmaskRequest:
    """What the controller asks every survivor: the seed shares of `survivors`, the key shares of `dropped`."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


def pair_mask(private: bytes, their_public: bytes, me: str, them: str, context: bytes, length: int) -> np.ndarray:
    """The mask `me` and `them` share (either's private key with the other's public key gives it): `me` adds it to
    its vector if it sorts first, subtracts it otherwise."""
    low, high = sorted((me, them))
    key = crypto.agree(private, their_public, b"mask", _bind(context, low, high))
    return crypto.expand(key, length)


def self_mask(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """The mask a trainer's seed expands to in this attempt."""
    return crypto.expand(crypto.derive(seed, b"self", context), length)


def _share_association(context: bytes, sender: str, recipient: str) -> bytes:
    return _bind(context, sender, recipient)


class Trainer:
    """One trainer's side of one round attempt. Its secrets are fresh and never leave it but as shares; nothing of it
    is reused in another attempt."""

    def __init__(self, peer: str, context: bytes, entropy: Entropy = secrets.token_bytes):
        self.peer = peer
        self.context = context
        self._entropy = entropy
        self._share_private = crypto.field_secret(entropy)
        self._mask_private = crypto.field_secret(entropy)
        self._seed = crypto.field_secret(entropy)
        self.advertisement = Advertisement(
            peer,
            crypto.public_key(self._share_private),
            crypto.public_key(self._mask_private),
            crypto.commitment(self._seed, context),
        )
        self._roster: Roster | None = None
        self._sent: dict[str, bytes] = {}
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (its seed's share, its mask key's share) for me
        self._maskers: tuple[str, ...] | None = None
        self._answered: UnmaskRequest | None = None

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Recipient -> the ciphertext of its shares of my seed and mask key. Once per attempt: the same roster again
        gives the same ciphertexts (a lost message is sent again); another roster is refused."""
        if self._roster is not None:
            if roster != self._roster:
                raise SecAggError("a second, different roster for this attempt")
            return dict(self._sent)
        if roster.context != self.context:
            raise SecAggError("the roster is for another round attempt")
        if self.peer not in roster.peers or roster.member(self.peer) != self.advertisement:
            raise SecAggError("the roster does not hold my advertisement as I sent it")
        holders = {peer: roster.x(peer) for peer in roster.peers}
        seed_shares = split(int.from_bytes(self._seed, "little"), holders.values(), roster.threshold, self._entropy)
        key_shares = split(
            int.from_bytes(self._mask_private, "little"), holders.values(), roster.threshold, self._entropy
        )
        sent: dict[str, bytes] = {}
        for member in roster.members:
            x = holders[member.peer]
            if member.peer == self.peer:
                self._held[self.peer] = (seed_shares[x], key_shares[x])
                continue
            association = _share_association(self.context, self.peer, member.peer)
            key = crypto.agree(self._share_private, member.share_key, b"share", association)
            plaintext = share_bytes(seed_shares[x]) + share_bytes(key_shares[x])
            sent[member.peer] = crypto.seal(key, plaintext, association)
        self._roster, self._sent = roster, sent
        return dict(sent)

    def receive(self, sender: str, ciphertext: bytes) -> None:
        """Take the shares `sender` encrypted for me; SecAggError if they are not genuinely its, for me, this attempt.
        A copy of what I hold is ignored; another ciphertext from the same sender is refused."""
        if self._roster is None:
            raise SecAggError("shares before the roster")
        if sender == self.peer or sender not in self._roster.peers:
            raise SecAggError(f"{sender} is not another member of the roster")
        if len(ciphertext) != CIPHERTEXT_BYTES:
            raise SecAggError(f"shares are {CIPHERTEXT_BYTES} bytes encrypted, not {len(ciphertext)}")
        association = _share_association(self.context, sender, self.peer)
        key = crypto.agree(self._share_private, self._roster.member(sender).share_key, b"share", association)
        plaintext = crypto.unseal(key, ciphertext, association)
        shares = (share_from_bytes(plaintext[:SHARE_BYTES]), share_from_bytes(plaintext[SHARE_BYTES:]))
        if sender in self._held and self._held[sender] != shares:
            raise SecAggError(f"{sender} sent other shares already")
        self._held[sender] = shares

    @property
    def holds(self) -> frozenset[str]:
        """The owners whose shares I hold (myself included once I shared)."""
        return frozenset(self._held)

    def mask(self, encoded: np.ndarray, maskers: Collection[str]) -> np.ndarray:
        """My masked vector: `encoded` (uint32, `Quantizer.encode`) + PRG(seed) +- a pairwise mask per other masker,
        modulo 2^32. The maskers (U2) are fixed by the first call: another set later is refused."""
        if self._roster is None:
            raise SecAggError("masking before sharing: nobody could remove my masks if I dropped")
        chosen = self._roster.check_maskers(maskers)
        if self.peer not in chosen:
            raise SecAggError("asked to mask, but not named a masker")
        if self._maskers is not None and chosen != self._maskers:
            raise SecAggError("asked to mask again with other maskers")
        vector = np.asarray(encoded)
        if vector.dtype != np.uint32 or vector.ndim != 1:
            raise SecAggError("an encoded update is a vector of uint32")
        self._maskers = chosen
        length = vector.size
        masked = vector + self_mask(self._seed, self.context, length)
        for peer in chosen:
            if peer == self.peer:
                continue
            pair = pair_mask(
                self._mask_private, self._roster.member(peer).mask_key, self.peer, peer, self.context, length
            )
            if self.peer < peer:
                masked += pair
            else:
                masked -= pair
        return masked

    def reveal(self, request: UnmaskRequest) -> dict[str, int]:
        """Owner -> my share of its seed (a survivor) or of its mask key (dropped), for the owners whose shares I
        hold. Refused unless I masked, I am a survivor, the survivors are at least t and with the dropped make up
        exactly the maskers; and once answered, any other request of this attempt is refused."""
        if self._roster is None or self._maskers is None:
            raise SecAggError("asked to unmask before I masked")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError(f"asked for both shares of {sorted(survivors & dropped)}")
        if survivors | dropped != set(self._maskers) or len(survivors) + len(dropped) != len(self._maskers):
            raise SecAggError("the survivors and the dropped are not the maskers")
        if self.peer not in survivors:
            raise SecAggError("asked to unmask, but counted as dropped")
        if len(survivors) < self._roster.threshold:
            raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {self._roster.threshold}")
        canonical = UnmaskRequest(tuple(sorted(survivors)), tuple(sorted(dropped)))
        if self._answered is not None and canonical != self._answered:
            raise SecAggError("asked again with another split of the maskers: both shares of a trainer would leak")
        self._answered = canonical
        answer = {owner: self._held[owner][0] for owner in canonical.survivors if owner in self._held}
        answer.update({owner: self._held[owner][1] for owner in canonical.dropped if owner in self._held})
        return answer


@dataclass(frozen=True)
class UnmaskResult:
    total: np.ndarray  # uint32: the sum modulo 2^32 of the survivors' encoded updates
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    liars: tuple[str, ...]  # holders whose revealed shares were off the owner's polynomial


@dataclass
class Unmasker:
    """The controller's side of one round attempt, after the roster and the maskers are fixed."""

    roster: Roster
    maskers: tuple[str, ...]
    length: int
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    request: UnmaskRequest | None = None
    reveals: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        self.maskers = self.roster.check_maskers(self.maskers)
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise SecAggError(f"length: expected a whole number >= 0, got {self.length!r}")

    def offer_masked(self, peer: str, vector: np.ndarray) -> str | None:
        """Accept a masker's masked vector, or say why not (a reason for the log)."""
        if self.request is not None:
            return "the survivors are already fixed"
        if peer not in self.maskers:
            return f"{peer} is not a masker"
        if peer in self.masked:
            return f"{peer} already sent one"
        array = np.asarray(vector)
        if array.dtype != np.uint32 or array.shape != (self.length,):
            return f"a masked vector is {self.length} uint32 values"
        self.masked[peer] = array
        return None

    def close(self) -> UnmaskRequest:
        """Fix the survivors (who sent a masked vector) and the dropped (the other maskers): the one request every
        survivor is asked. SecAggError when the survivors are fewer than t (the attempt must be retried)."""
        if self.request is None:
            survivors = tuple(sorted(self.masked))
            if len(survivors) < self.roster.threshold:
                raise SecAggError(f"{len(survivors)} masked vectors, fewer than the threshold {self.roster.threshold}")
            self.request = UnmaskRequest(survivors, tuple(p for p in self.maskers if p not in self.masked))
        return self.request

    def offer_reveal(self, peer: str, shares: Mapping[str, int]) -> str | None:
        """Accept a survivor's answer to the request, or say why not."""
        if self.request is None:
            return "no request was made"
        if peer not in self.request.survivors:
            return f"{peer} is not a survivor"
        if peer in self.reveals:
            return f"{peer} already answered"
        if not set(shares) <= set(self.maskers):
            return f"shares of {sorted(set(shares) - set(self.maskers))}, who are not maskers"
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < PRIME for v in shares.values()):
            return "a share is not a field element"
        self.reveals[peer] = dict(shares)
        return None

    def _shares_of(self, owner: str) -> dict[int, int]:
        return {self.roster.x(h): shares[owner] for h, shares in self.reveals.items() if owner in shares}

    @property
    def sufficient(self) -> bool:
        """Every secret the sum needs has at least t shares in (more may still be worth waiting for: liars)."""
        if self.request is None:
            return False
        owners = self.request.survivors + self.request.dropped
        return all(len(self._shares_of(owner)) >= self.roster.threshold for owner in owners)

    @property
    def complete(self) -> bool:
        return self.request is not None and set(self.reveals) == set(self.request.survivors)

    def _seed_check(self, owner: str) -> Callable[[int], bool]:
        """Is a candidate the seed `owner` committed to?"""
        digest, context = self.roster.member(owner).seed_digest, self.roster.context
        return lambda value: crypto.commitment(_secret_bytes(value), context) == digest

    def _key_check(self, owner: str) -> Callable[[int], bool]:
        """Is a candidate the private key of the mask key `owner` published?"""
        public = self.roster.member(owner).mask_key
        return lambda value: crypto.public_key(_secret_bytes(value)) == public

    def total(self) -> UnmaskResult:
        """The sum of the survivors' encoded updates; SecAggError if a secret cannot be rebuilt from the shares in."""
        request = self.close()
        if not self.complete and not self.sufficient:
            raise SecAggError("too few answers to rebuild the masks")
        liars: set[int] = set()
        total = np.zeros(self.length, dtype=np.uint32)
        for vector in self.masked.values():
            total += vector
        for owner in request.survivors:
            seed_value, wrong = recover(self._shares_of(owner), self.roster.threshold, self._seed_check(owner))
            liars.update(wrong)
            total -= self_mask(_secret_bytes(seed_value), self.roster.context, self.length)
        for owner in request.dropped:
            key_value, wrong = recover(self._shares_of(owner), self.roster.threshold, self._key_check(owner))
            liars.update(wrong)
            private = _secret_bytes(key_value)
            for peer in request.survivors:
                pair = pair_mask(
                    private, self.roster.member(peer).mask_key, owner, peer, self.roster.context, self.length
                )
                # the survivor added +pair if it sorts before the dropped trainer, -pair after: take it back out
                if peer < owner:
                    total -= pair
                else:
                    total += pair
        liar_peers = tuple(self.roster.peers[x - 1] for x in sorted(liars))
        return UnmaskResult(total, request.survivors, request.dropped, liar_peers)


def _secret_bytes(value: int) -> bytes:
    return value.to_bytes(crypto.KEY_BYTES, "little")
