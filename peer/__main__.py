"""`python -m peer`: read the settings, load this peer's shard, join the federation."""
from __future__ import annotations

import signal
import sys

from .config import SettingsError, build_parser, load_settings


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:   # Ctrl-C while the dataset or TensorFlow is still loading: no traceback
        print("python -m peer: stopped", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as err:
        build_parser().print_usage(sys.stderr)
        print(f"python -m peer: error: {err}", file=sys.stderr)
        return 2

    # Imported after the settings are valid: a typo in a flag should not wait for TensorFlow.
    from .data import DatasetError, load_shard
    from .learner import Learner
    from .node import Peer, configure_logging
    from .records import RunRecorder

    configure_logging(settings.peer_id, settings.log_level)   # before the dataset: its loader has things to say
    try:
        shard = load_shard(settings)
    except DatasetError as err:
        print(f"python -m peer: error: {err}", file=sys.stderr)
        return 2
    RunRecorder(settings.run_dir, settings.peer_id).data(shard.describe(settings))
    learner = Learner(settings.dataset, shard, settings.epochs, settings.batch_size, settings.seed)
    learner.prepare()

    def stop(signum, frame):  # SIGTERM (docker stop, launcher shutdown): leave cleanly, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    peer = Peer(settings, learner)
    try:
        return peer.run()
    except KeyboardInterrupt:
        peer.log.info("stopped by signal")
        return 130


if __name__ == "__main__":
    sys.exit(main())
