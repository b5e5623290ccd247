"""Secure aggregation (Bonawitz et al., CCS 2017): the controller learns the sum of the trainers' updates and nothing
else about any one of them, even when trainers drop out after masking. Pure modules: no I/O, no clock, no logging;
randomness comes in as an `Entropy` callable (bytes on demand), so tests can seed it.

- `quantize`: weighted float updates to integers modulo 2^32 and back (fixed point, clipping, the error bound);
- `shamir`: t-of-n secret sharing over the prime field of 2^255 - 19;
- `crypto`: X25519 key pairs, HKDF-SHA256 key agreement, ChaCha20-Poly1305 for the shares, the ChaCha20 mask PRG;
- `masking`: one round attempt: the trainer's secrets (`Trainer`), the roster every trainer masks against
  (`Roster`), and the controller's unmasking of the sum (`Unmasker`).

docs/PROTOCOL.md (Secure aggregation) gives the messages that carry these values; docs/SECURITY.md what it defeats.
"""
