"""The primitives, all from the `cryptography` package: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305 for the
encrypted shares and the ChaCha20 keystream as the mask PRG.

Every derived key is bound to a purpose and to the round attempt's `context` (run, term, round, attempt), so a key,
a share or a mask of one attempt means nothing in another, even if a peer reused its keys by mistake (it does not:
`Trainer` draws fresh ones per attempt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.shamir import PRIME

DOMAIN = b"sdfl secagg v1"
KEY_BYTES = 32  # X25519 keys, seeds, derived keys
TAG_BYTES = 16  # Poly1305
_NONCE = bytes(12)  # every AEAD key encrypts exactly one message (it is derived per sender, recipient and attempt)
_STREAM_NONCE = bytes(16)  # every PRG key expands exactly one mask
Entropy = Callable[[int], bytes]


def field_secret(entropy: Entropy) -> bytes:
    """32 random bytes whose little-endian value is a field element (top bit clear, below 2^255 - 19): a secret that
    can be Shamir-shared as it is. X25519 ignores the top bit of a private key, so nothing is lost for keys."""
    while True:
        raw = bytearray(entropy(KEY_BYTES))
        if len(raw) != KEY_BYTES:
            raise SecAggError("the entropy source gave the wrong number of bytes")
        raw[-1] &= 0x7F
        if int.from_bytes(raw, "little") < PRIME:  # all but 19 of 2^255 values
            return bytes(raw)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def derive(secret: bytes, purpose: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 of `secret` into a 32-byte key for `purpose` in `context`."""
    info = b"|".join((DOMAIN, purpose, context))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private: bytes, their_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """The key two peers share: X25519 of one's private key and the other's public key, through HKDF. A public key
    of the wrong size or of low order (whose agreement is all zeros) is refused."""
    if len(their_public) != KEY_BYTES:
        raise SecAggError(f"a public key is {KEY_BYTES} bytes, not {len(their_public)}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:
        raise SecAggError("a public key of low order (no shared secret)") from None
    return derive(shared, purpose, context)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 of `plaintext` under a single-use key, binding `associated` (who, to whom, which attempt)."""
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, associated)


def unseal(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext, or SecAggError if anything was changed, or the ciphertext was made for another key or
    association (another sender, recipient or attempt)."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, associated)
    except InvalidTag:
        raise SecAggError(
            "a share that does not decrypt (forged, changed, or meant for another peer or round)"
        ) from None


def expand(key: bytes, length: int) -> np.ndarray:
    """The mask of a PRG key: `length` uint32 values of the ChaCha20 keystream (little-endian words)."""
    if len(key) != KEY_BYTES:
        raise SecAggError(f"a mask key is {KEY_BYTES} bytes, not {len(key)}")
    stream = Cipher(algorithms.ChaCha20(key, _STREAM_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32, copy=False)


def commitment(seed: bytes, context: bytes) -> bytes:
    """SHA-256 of a self-mask seed in its context: published before the seed is shared, so that the controller can
    tell the seed from what lying holders make of it."""
    return hashlib.sha256(b"|".join((DOMAIN, b"seed", context, seed))).digest()
