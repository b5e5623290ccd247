"""Settings: one dataclass, filled from command-line flags, then environment variables, then defaults.

Containers set FL_* environment variables; people type flags. A flag beats its variable. Every value is validated
here, so the rest of the program can trust `Settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Fast imports only (numpy at most): a bad flag must be reported before TensorFlow would have loaded.
from peer.learning.aggregation import AGGREGATIONS
from peer.learning.data import DATASETS, DEFAULT_SEED, ShardSpec
from peer.learning.models import BUILT_INS, ModelError, check_spec, default_model, defaults_text
from peer.learning.partition import DEFAULT_ALPHA, SCHEMES
from peer.roles.controller import RoundRules
from peer.wire.envelope import MAX_MESSAGE_BYTES, MIN_CHUNKED_MESSAGE_BYTES, MIN_SECRET_BYTES
from peer.wire.ids import PEER_ID_PATTERN, TOPIC_PREFIX_PATTERN, valid_run_id
from peer.wire.weights import WIRE_DTYPES


def read_secret_file(path) -> bytes:
    """The federation secret in the file at `path`, trailing CR and LF bytes stripped. ValueError naming the file if
    it cannot be read, is empty, or holds fewer than MIN_SECRET_BYTES bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"secret file {path}: cannot read it ({err.strerror or err})") from None
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret file {path}: the secret has {len(secret)} bytes; it needs at least "
            f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32 > {path}`)"
        )
    return secret


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    broker_host: str = "localhost"
    broker_port: int = 1883
    peer_id: str = ""
    min_peers: int = 5
    trainers: int = 3
    min_solutions: int = 2
    evaluators: int = 0  # peers asked to evaluate a round's model; 0: every peer
    max_rounds: int = 10
    target_accuracy: float = 0.99
    dataset: str = "mnist"
    model: str | None = None  # a --model spec; load_settings puts the dataset's default in for None
    data_dir: Path | None = None
    shard: int = 0
    num_shards: int = 1
    partition: str = "iid"
    alpha: float = DEFAULT_ALPHA
    seed: int = DEFAULT_SEED
    train_samples: int | None = None
    test_samples: int | None = None
    epochs: int = 1
    batch_size: int = 32
    run_dir: Path = Path("runs/latest")
    topic_prefix: str = "sd"
    keepalive: int = 5
    heartbeat: float = 1.0
    election_window: float = 1.0
    round_deadline: float = 60.0
    aggregation: str = "fedavg"
    wire_dtype: str = "float32"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    wait_timeout: float = 600.0
    run_id: str = "default"
    resume: bool = False
    secret_file: Path | None = None
    secret: bytes | None = field(default=None, repr=False)  # from --secret-file or FL_SECRET; never logged
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    learning_service: Path | None = None  # the Unix socket of this machine's learning service

    @property
    def broker(self) -> str:
        return f"{self.broker_host}:{self.broker_port}"

    @property
    def shard_label(self) -> str:
        return self.shard_spec.label

    @property
    def shard_spec(self) -> ShardSpec:
        """Which shard of which dataset this peer holds (`peer.learning.data.load_shard`)."""
        return ShardSpec(
            self.dataset,
            self.data_dir,
            self.shard,
            self.num_shards,
            self.partition,
            self.alpha,
            self.seed,
            self.train_samples,
            self.test_samples,
        )

    def round_rules(self) -> RoundRules:
        """What a controller of this peer needs of the settings."""
        return RoundRules(
            self.trainers,
            self.min_solutions,
            self.evaluators,
            self.max_rounds,
            self.target_accuracy,
            self.round_deadline,
            self.heartbeat,
            self.wait_timeout,
            self.aggregation,
            self.wire_dtype,
            self.public_dict(),
        )

    def public_dict(self) -> dict:
        """Every setting, as JSON-ready values, without the password (for run.json and logs)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("password", "secret"):
                value = "***" if value else None
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        out["broker"] = self.broker
        out["shard"] = self.shard_label
        del out["broker_host"], out["broker_port"], out["num_shards"]
        return out


# --- parsers: each turns user text into a value or raises SettingsError with the reason -----------------------------


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), "1883"
    if not host:
        raise SettingsError(f"broker {text!r}: expected HOST:PORT, e.g. localhost:1883")
    try:
        number = int(port)
    except ValueError:
        raise SettingsError(f"broker {text!r}: port {port!r} is not a number (expected HOST:PORT)") from None
    if not 1 <= number <= 65535:
        raise SettingsError(f"broker {text!r}: port must be 1..65535")
    return host, number


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise SettingsError(f"shard {text!r}: expected K/N, e.g. 0/5 (K counts from 0)")
    k, n = int(match[1]), int(match[2])
    if n < 1 or k >= n:
        raise SettingsError(f"shard {text!r}: need 0 <= K < N (K counts from 0)")
    return k, n


def whole_number(low: int | None = None, high: int | None = None):
    """A parser of a whole number within [low, high]; SettingsError says what is wrong (the caller names the
    setting)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SettingsError(f"{text!r} is not a whole number") from None
        if low is not None and value < low:
            raise SettingsError(
                f"must not be negative, got {value}" if low == 0 else f"must be at least {low}, got {value}"
            )
        if high is not None and value > high:
            raise SettingsError(f"must be at most {high}, got {value}")
        return value

    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A parser of a finite number within low..high (an open end excluded); SettingsError says what is wrong."""

    def inside(value: float) -> bool:
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise SettingsError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise SettingsError(f"must be a finite number, got {text!r}")
        if not inside(value):
            raise SettingsError(f"must be {_range(low, high, low_open, high_open)}, got {value:g}")
        return value

    return parse


def _range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        excluded = [f"{end:g}" for end, is_open in ((low, low_open), (high, high_open)) if is_open]
        return f"between {low:g} and {high:g}" + (f", {' and '.join(excluded)} excluded" if excluded else "")
    if low is not None:
        if low_open:
            return "a positive number" if low == 0 else f"above {low:g}"
        return f"at least {low:g}"
    return f"below {high:g}" if high_open else f"at most {high:g}"


def _choice(choices: tuple[str, ...]):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise SettingsError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _peer_id(text: str) -> str:
    if not PEER_ID_PATTERN.fullmatch(text):
        raise SettingsError(f"peer id {text!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return text


def _run_id(text: str) -> str:
    if not valid_run_id(text):
        raise SettingsError(f"run id {text!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return text


def _model(text: str) -> str:
    try:
        return check_spec(text)
    except ModelError as err:
        raise SettingsError(str(err)) from None


def _switch(text: str) -> bool:
    """A yes/no setting: the flag alone means yes; its variable takes 1/0, true/false, yes/no."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{text!r} is not yes or no (1/0, true/false, yes/no)")


def _prefix(text: str) -> str:
    if not TOPIC_PREFIX_PATTERN.fullmatch(text):
        raise SettingsError(f"topic prefix {text!r}: use letters, digits, '.', '_', '-' and '/' between levels")
    return text


# (flag, env var, field(s), parser, help). The table is the single source of the user-facing names.
OPTIONS = [
    (
        "--broker",
        "FL_BROKER",
        ("broker_host", "broker_port"),
        parse_broker,
        "MQTT broker as HOST:PORT (default localhost:1883)",
    ),
    ("--peer-id", "FL_PEER_ID", "peer_id", _peer_id, "this peer's unique id (default: random, e.g. peer-3f9a2c)"),
    (
        "--min-peers",
        "FL_MIN_PEERS",
        "min_peers",
        whole_number(2),
        "peers present before the first election (default 5)",
    ),
    ("--trainers", "FL_TRAINERS", "trainers", whole_number(1), "trainers chosen per round (default 3)"),
    (
        "--min-solutions",
        "FL_MIN_SOLUTIONS",
        "min_solutions",
        whole_number(1),
        "solutions a round needs to close at its deadline (default 2, capped at the trainers chosen)",
    ),
    (
        "--evaluators",
        "FL_EVALUATORS",
        "evaluators",
        whole_number(0),
        "peers (chosen at random each round) that evaluate a round's model; every peer evaluates the last one "
        "(default 0: every peer, every round)",
    ),
    ("--max-rounds", "FL_MAX_ROUNDS", "max_rounds", whole_number(1), "round limit (default 10)"),
    (
        "--target-accuracy",
        "FL_TARGET_ACCURACY",
        "target_accuracy",
        number(0.0, 1.0),
        "stop when the global accuracy reaches this (default 0.99)",
    ),
    ("--dataset", "FL_DATASET", "dataset", _choice(DATASETS), f"{' | '.join(DATASETS)} (default mnist)"),
    (
        "--model",
        "FL_MODEL",
        "model",
        _model,
        f"the model to train: {' | '.join(BUILT_INS)}, or MODULE:FUNCTION (an importable module) or FILE.py:FUNCTION, "
        "naming a function(input_shape, num_classes) that returns a compiled Keras model, e.g. "
        f"docs/examples/custom_model.py:build_model (default: {defaults_text()}; all peers must agree)",
    ),
    (
        "--data-dir",
        "FL_DATA_DIR",
        "data_dir",
        Path,
        "folder of IDX files (default: the Keras download cache; "
        "fashion-mnist also looks in /usr/share/datasets/fashion-mnist)",
    ),
    (
        "--shard",
        "FL_SHARD",
        ("shard", "num_shards"),
        parse_shard,
        "this peer's partition K/N of train and test data, K from 0 (default 0/1)",
    ),
    ("--partition", "FL_PARTITION", "partition", _choice(SCHEMES), "how data is split among peers (default iid)"),
    (
        "--alpha",
        "FL_ALPHA",
        "alpha",
        number(0.0, low_open=True),
        f"Dirichlet concentration for --partition dirichlet (default {DEFAULT_ALPHA})",
    ),
    (
        "--seed",
        "FL_SEED",
        "seed",
        whole_number(0),
        f"seed of the data partition (default {DEFAULT_SEED}; all peers must agree)",
    ),
    ("--train-samples", "FL_TRAIN_SAMPLES", "train_samples", whole_number(1), "cap on this peer's training samples"),
    ("--test-samples", "FL_TEST_SAMPLES", "test_samples", whole_number(1), "cap on this peer's test samples"),
    ("--epochs", "FL_EPOCHS", "epochs", whole_number(1), "local epochs per round (default 1)"),
    ("--batch-size", "FL_BATCH_SIZE", "batch_size", whole_number(1), "local batch size (default 32)"),
    ("--run-dir", "FL_RUN_DIR", "run_dir", Path, "folder for the run's records (default runs/latest)"),
    ("--topic-prefix", "FL_TOPIC_PREFIX", "topic_prefix", _prefix, "MQTT topic prefix (default sd)"),
    (
        "--keepalive",
        "FL_KEEPALIVE",
        "keepalive",
        whole_number(1, 65535),
        "MQTT keepalive in seconds; a hung peer is declared gone after 1.5x (default 5)",
    ),
    (
        "--heartbeat",
        "FL_HEARTBEAT",
        "heartbeat",
        number(0.05),
        "controller heartbeat interval in seconds; 3 missed = controller silent (default 1)",
    ),
    (
        "--election-window",
        "FL_ELECTION_WINDOW",
        "election_window",
        number(0.05),
        "seconds votes are collected before a claim (default 1)",
    ),
    (
        "--round-deadline",
        "FL_ROUND_DEADLINE",
        "round_deadline",
        number(0.5),
        "seconds a round waits for solutions or evaluations (default 60)",
    ),
    (
        "--aggregation",
        "FL_AGGREGATION",
        "aggregation",
        _choice(AGGREGATIONS),
        f"how solutions become the global model: {' | '.join(AGGREGATIONS)} (default fedavg; the others resist "
        "trainers that lie, see docs/SECURITY.md)",
    ),
    (
        "--wire-dtype",
        "FL_WIRE_DTYPE",
        "wire_dtype",
        _choice(WIRE_DTYPES),
        "how model weights travel: float32, or float16 at half the bytes (a tensor with values beyond float16's range "
        "still travels as float32) (default float32)",
    ),
    (
        "--max-message-bytes",
        "FL_MAX_MESSAGE_BYTES",
        "max_message_bytes",
        whole_number(MIN_CHUNKED_MESSAGE_BYTES, MAX_MESSAGE_BYTES),
        "the broker's message_size_limit: a model larger than this travels in chunks (default and most 16777216, "
        "mosquitto's setting in broker/)",
    ),
    (
        "--wait-timeout",
        "FL_WAIT_TIMEOUT",
        "wait_timeout",
        number(1.0),
        "seconds a peer waits for enough peers (before the first election, or as controller) before it gives up "
        "with exit code 4 (default 600)",
    ),
    (
        "--run-id",
        "FL_RUN_ID",
        "run_id",
        _run_id,
        "the run this peer belongs to: its messages travel under it, so runs on one broker never mix, and a peer "
        "started for a run that has finished exits 0 saying so (default: default; the launchers make a new one per run)",
    ),
    (
        "--resume",
        "FL_RESUME",
        "resume",
        _switch,
        "go on with the run whose checkpoint is in --run-dir (written after every finished round): its run id, model "
        "and round numbering carry on",
    ),
    (
        "--secret-file",
        "FL_SECRET_FILE",
        "secret_file",
        Path,
        f"file holding the federation secret (at least {MIN_SECRET_BYTES} bytes): every message is signed with it and "
        "unsigned or wrongly signed ones are ignored. Or set FL_SECRET to the secret itself. Without one, any client "
        "of the broker can speak for the federation (see docs/SECURITY.md)",
    ),
    ("--username", "FL_USERNAME", "username", str, "broker user name"),
    ("--password", "FL_PASSWORD", "password", str, "broker password (prefer the FL_PASSWORD variable)"),
    (
        "--log-level",
        "FL_LOG_LEVEL",
        "log_level",
        _choice(("debug", "info", "warning", "error")),
        "debug | info | warning | error (default info)",
    ),
    (
        "--learning-service",
        "FL_LEARNING_SERVICE",
        "learning_service",
        Path,
        "the Unix socket of this machine's learning service (python -m peer.learning.service), which runs the "
        "learning jobs of every peer of the machine; the launchers start one per run of local peers. Without it, or "
        "when it does not answer, the peer starts a service of its own",
    ),
]

ENV_NAMES = frozenset(env for _, env, _, _, _ in OPTIONS)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with the usage line, as argparse does, but name the fix
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help` for every setting)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m peer",
        description="A federated-learning peer. Start several against one MQTT broker: they elect a controller "
        "and train together. Every flag also reads an environment variable (shown in brackets).",
    )
    for flag, env, _, parse, text in OPTIONS:
        if parse is _switch:
            parser.add_argument(flag, dest=_dest(flag), action="store_const", const="yes", help=f"{text} [{env}]")
        else:
            parser.add_argument(flag, dest=_dest(flag), metavar=env.removeprefix("FL_"), help=f"{text} [{env}]")
    return parser


def _secret(path: Path | None, text: str | None) -> bytes | None:
    """The federation secret: the file's, or FL_SECRET's (never a flag: a command line is visible to every user)."""
    if path is not None and text is not None:
        raise SettingsError("both --secret-file and FL_SECRET are set: give the secret one way")
    if path is not None:
        try:
            return read_secret_file(path)
        except ValueError as err:
            raise SettingsError(f"--secret-file: {err}") from None
    if text is not None:
        if len(text.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"FL_SECRET: the secret has {len(text.encode())} bytes; it needs at least {MIN_SECRET_BYTES}"
            )
        return text.encode()
    return None


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then FL_* variables, then defaults. Raises SettingsError naming the flag or variable at fault."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict = {}
    for flag, env, fields, parse, _ in OPTIONS:
        text, source = getattr(args, _dest(flag)), flag
        if text is None:
            text, source = environ.get(env), env
        if text is None or text == "":
            continue
        try:
            parsed = parse(text)
        except SettingsError as err:
            raise SettingsError(f"{source}: {err}") from None
        if isinstance(fields, tuple):
            values.update(zip(fields, parsed))
        else:
            values[fields] = parsed
    if not values.get("peer_id"):
        values["peer_id"] = f"peer-{secrets.token_hex(3)}"
    values["secret"] = _secret(values.get("secret_file"), environ.get("FL_SECRET") or None)
    settings = Settings(**values)
    if settings.model is None:
        settings = dataclasses.replace(settings, model=default_model(settings.dataset))
    if not settings.username and settings.password:
        raise SettingsError("--password given without --username")
    return settings
