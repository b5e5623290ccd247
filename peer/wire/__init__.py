"""The wire: ids, messages and their encoding, the envelope, chunks, the receive and send session. Pure."""
