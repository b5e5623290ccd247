"""The run dir: its files, the one writer per peer, the readers, the checkpoint and the typed events."""
