"""`python -m peer`: read the settings, load this peer's shard, join the federation."""

from __future__ import annotations

import dataclasses
import sys

from peer.config import Settings, SettingsError, build_parser, load_settings
from peer.node.banners import without_tensorflow_banners
from peer.node.signals import StopSignals


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the dataset or TensorFlow is still loading: no traceback
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
    from peer.learning.data import DatasetError, load_shard
    from peer.learning.link import LinkError
    from peer.learning.models import ModelError
    from peer.learning.remote import ServiceHandle
    from peer.node.jobs import remote_learner
    from peer.node.logs import configure_logging
    from peer.node.loop import Peer
    from peer.records.run_dir import RunRecorder

    try:
        recorder = RunRecorder(settings.run_dir, settings.peer_id)
        recorder.check_writable()
    except OSError as err:
        return _error(
            f"the run dir {settings.run_dir} is not writable ({err.strerror or err}): pass --run-dir with a "
            "folder this user can write"
        )
    # From here on, an error is also this peer's `exit` event, with its reason (the launcher prints it).
    tls = settings.tls_context()
    if tls is not None:
        from peer.node.transport import untrusted_broker

        refused = untrusted_broker(settings.brokers, tls)
        if refused:
            return _error(f"--tls-ca {settings.tls_ca}: {refused}", settings)
    try:
        resume = _resume(settings) if settings.resume else None
    except ValueError as err:
        return _error(str(err), settings)
    if resume:
        settings = dataclasses.replace(settings, run_id=resume.run_id)

    log = configure_logging(settings.peer_id, settings.log_level)  # before the dataset: its loader has things to say
    spec = settings.shard_spec
    with without_tensorflow_banners():
        try:
            labels = load_shard(spec, images=False)  # the images are the learning service's to load
        except DatasetError as err:
            return _error(str(err), settings)
        recorder.data(labels.describe(spec, settings.peer_id))
        service = ServiceHandle(settings.learning_service)
        try:
            learner = remote_learner(settings, service, labels)
        except (ModelError, DatasetError, LinkError) as err:
            service.close()
            return _error(str(err), settings)
    log.info("model: %s, fingerprint %s", learner.model_description(), learner.fingerprint())
    if resume and [w.shape for w in resume.model.weights] != [w.shape for w in learner.initial_weights()]:
        service.close()
        return _error(
            f"--resume: the checkpoint's model in {settings.run_dir} does not fit this peer's model (is it "
            "the same --dataset and --model?)",
            settings,
        )

    peer = Peer(settings, learner, resume=resume)
    with StopSignals():  # SIGTERM (docker stop, launcher shutdown): leave cleanly, as Ctrl-C does
        try:
            return peer.run()
        except KeyboardInterrupt:
            peer.log.info("stopped by signal")
            return 130
        except Exception as err:  # a bug: the traceback goes to the log, the one line to the events
            _record_exit(settings, 1, f"crashed: {type(err).__name__}: {err}")
            raise
        finally:
            service.close()


def _error(text: str, settings: Settings | None = None) -> int:
    print(f"python -m peer: error: {text}", file=sys.stderr)
    if settings is not None:
        _record_exit(settings, 2, text)
    return 2


def _record_exit(settings: Settings, code: int, reason: str) -> None:
    from peer.records.events import record_exit

    record_exit(settings.run_dir, settings.peer_id, code, reason)


def _resume(settings):
    """The checkpoint in the run dir as the peer holds a run; ValueError saying why it cannot be used."""
    from peer.records.checkpoint import run_state
    from peer.records.run_dir import CheckpointError, read_checkpoint, read_elections
    from peer.wire.errors import ProtocolError

    try:
        checkpoint = read_checkpoint(settings.run_dir)
    except CheckpointError as err:
        raise ValueError(f"--resume: {err}") from None
    if checkpoint is None:
        raise ValueError(
            f"--resume: no checkpoint in {settings.run_dir} (a run writes one after every finished "
            "round; pass the run dir of the run to go on with)"
        )
    if settings.run_id not in ("default", checkpoint.run_id):
        raise ValueError(
            f"--resume: the checkpoint in {settings.run_dir} is of run {checkpoint.run_id}, not "
            f"{settings.run_id} (leave --run-id out to go on with it)"
        )
    try:
        state = run_state(checkpoint)
    except (ProtocolError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--resume: the checkpoint in {settings.run_dir} is damaged ({err})") from None
    # Terms elected after the last checkpoint are used too: the resumed run's first term comes after all of them,
    # so the records never show two controllers of one term.
    terms = [election.term for election in read_elections(settings.run_dir)]
    return dataclasses.replace(state, term=max(terms, default=state.model.term))


if __name__ == "__main__":
    sys.exit(main())
