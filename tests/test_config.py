import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from peer.config import ENV_NAMES, OPTIONS, Settings, SettingsError, load_settings, number, whole_number
from peer.learning import data, partition
from peer.wire.ids import PEER_ID_PATTERN

# Two secret files for the samples below (a file flag needs a file to read).
_KEYS = Path(tempfile.mkdtemp(prefix="fl-config-test-"))
KEY_A, KEY_B = _KEYS / "a.key", _KEYS / "b.key"
KEY_A.write_bytes(b"a" * 16 + b"\n")
KEY_B.write_bytes(b"b" * 40)

ROOT = Path(__file__).resolve().parent.parent

# Per flag: two valid texts and the fields each must produce. Both differ from the defaults and from each other, so
# a test can tell which source won. Extra settings that a value needs to be legal go in the third slot.
SAMPLES = {
    "--broker": [
        ("mqtt.example:8883", {"broker_host": "mqtt.example", "broker_port": 8883}),
        ("10.0.0.7", {"broker_host": "10.0.0.7", "broker_port": 1883}),
    ],
    "--peer-id": [("peer-7", {"peer_id": "peer-7"}), ("A.b_c-9", {"peer_id": "A.b_c-9"})],
    "--min-peers": [("2", {"min_peers": 2}), ("12", {"min_peers": 12})],
    "--trainers": [("1", {"trainers": 1}), ("7", {"trainers": 7})],
    "--min-solutions": [("1", {"min_solutions": 1}), ("4", {"min_solutions": 4})],
    "--evaluators": [("1", {"evaluators": 1}), ("10", {"evaluators": 10})],
    "--max-rounds": [("1", {"max_rounds": 1}), ("250", {"max_rounds": 250})],
    "--target-accuracy": [("0.8", {"target_accuracy": 0.8}), ("1", {"target_accuracy": 1.0})],
    "--dataset": [("cifar10", {"dataset": "cifar10"}), ("Fashion-MNIST", {"dataset": "fashion-mnist"})],
    "--model": [
        ("Seed-CNN", {"model": "seed-cnn"}),
        ("docs/examples/custom_model.py:build_model", {"model": "docs/examples/custom_model.py:build_model"}),
    ],
    "--data-dir": [("/tmp/data-a", {"data_dir": Path("/tmp/data-a")}), ("rel/b", {"data_dir": Path("rel/b")})],
    "--secret-file": [
        (str(KEY_A), {"secret_file": KEY_A, "secret": b"a" * 16}),
        (str(KEY_B), {"secret_file": KEY_B, "secret": b"b" * 40}),
    ],
    "--shard": [("2/5", {"shard": 2, "num_shards": 5}), (" 0 / 3 ", {"shard": 0, "num_shards": 3})],
    "--partition": [("dirichlet", {"partition": "dirichlet"}), ("shards", {"partition": "shards"})],
    "--alpha": [("0.1", {"alpha": 0.1}), ("100", {"alpha": 100.0})],
    "--seed": [("0", {"seed": 0}), ("12345", {"seed": 12345})],
    "--train-samples": [("1", {"train_samples": 1}), ("600", {"train_samples": 600})],
    "--test-samples": [("50", {"test_samples": 50}), ("2", {"test_samples": 2})],
    "--epochs": [("2", {"epochs": 2}), ("5", {"epochs": 5})],
    "--batch-size": [("1", {"batch_size": 1}), ("128", {"batch_size": 128})],
    "--run-dir": [("/tmp/run-a", {"run_dir": Path("/tmp/run-a")}), ("runs/b", {"run_dir": Path("runs/b")})],
    "--topic-prefix": [("fl/test", {"topic_prefix": "fl/test"}), ("x", {"topic_prefix": "x"})],
    "--keepalive": [("1", {"keepalive": 1}), ("60", {"keepalive": 60})],
    "--heartbeat": [("0.05", {"heartbeat": 0.05}), ("2.5", {"heartbeat": 2.5})],
    "--election-window": [("0.2", {"election_window": 0.2}), ("3", {"election_window": 3.0})],
    "--round-deadline": [("0.5", {"round_deadline": 0.5}), ("600", {"round_deadline": 600.0})],
    "--aggregation": [("median", {"aggregation": "median"}), ("Trimmed-Mean", {"aggregation": "trimmed-mean"})],
    "--wait-timeout": [("1", {"wait_timeout": 1.0}), ("3600", {"wait_timeout": 3600.0})],
    "--wire-dtype": [("float16", {"wire_dtype": "float16"}), ("Float16", {"wire_dtype": "float16"})],
    "--max-message-bytes": [("65536", {"max_message_bytes": 65536}), ("1000000", {"max_message_bytes": 1000000})],
    "--run-id": [("run-1", {"run_id": "run-1"}), ("2026.11.24_a", {"run_id": "2026.11.24_a"})],
    "--username": [("alice", {"username": "alice"}), ("bob", {"username": "bob"})],
    "--password": [("s3cret", {"password": "s3cret"}), ("p w", {"password": "p w"})],
    "--log-level": [("DEBUG", {"log_level": "debug"}), ("warning", {"log_level": "warning"})],
    "--learning-service": [
        ("/run/sdfl/learn.sock", {"learning_service": Path("/run/sdfl/learn.sock")}),
        ("learn.sock", {"learning_service": Path("learn.sock")}),
    ],
}
# A password alone is refused, so its samples need a user name too.
NEEDS = {"--password": {"--username": "someone"}}

FLAG_TO_ENV = {flag: env for flag, env, *_ in OPTIONS}


def as_args(values: dict) -> list[str]:
    # --flag=value, so values that start with '-' are not mistaken for flags.
    return [f"{flag}={text}" for flag, text in values.items()]


def as_env(values: dict) -> dict:
    return {FLAG_TO_ENV[flag]: text for flag, text in values.items()}


def fields_of(settings: Settings, expected: dict) -> dict:
    return {name: getattr(settings, name) for name in expected}


# --- the table --------------------------------------------------------------------------------------------------------

SWITCHES = {"--resume"}  # flags without a value: tested on their own below


def test_every_option_has_samples():
    assert set(SAMPLES) == {flag for flag, *_ in OPTIONS} - SWITCHES


def test_env_names_match_the_table():
    names = [env for _, env, *_ in OPTIONS]
    assert ENV_NAMES == frozenset(names)
    assert len(names) == len(set(names))
    assert all(name.startswith("FL_") for name in ENV_NAMES)
    for flag, env, *_ in OPTIONS:
        assert env == "FL_" + flag.removeprefix("--").upper().replace("-", "_")


def test_flags_are_unique_and_cover_every_setting():
    flags = [flag for flag, *_ in OPTIONS]
    assert len(flags) == len(set(flags))
    covered = set()
    for _, _, fields, _, _ in OPTIONS:
        covered.update(fields if isinstance(fields, tuple) else (fields,))
    # The secret itself is no flag (a command line is visible to every user): it comes from --secret-file or FL_SECRET.
    assert covered == {f.name for f in dataclasses.fields(Settings)} - {"secret"}


# --- defaults and precedence ------------------------------------------------------------------------------------------


def test_defaults():
    s = load_settings([], {})
    assert (s.broker_host, s.broker_port, s.broker) == ("localhost", 1883, "localhost:1883")
    assert (s.min_peers, s.trainers, s.min_solutions, s.max_rounds) == (5, 3, 2, 10)
    assert s.target_accuracy == 0.99
    assert (s.dataset, s.data_dir, s.partition, s.alpha, s.seed) == ("mnist", None, "iid", 0.5, 42)
    assert s.model == "cnn-small"
    assert (s.shard, s.num_shards, s.shard_label) == (0, 1, "0/1")
    assert (s.train_samples, s.test_samples, s.epochs, s.batch_size) == (None, None, 1, 32)
    assert s.run_dir == Path("runs/latest")
    assert (s.topic_prefix, s.keepalive, s.heartbeat, s.election_window, s.round_deadline) == ("sd", 5, 1.0, 1.0, 60.0)
    assert (s.username, s.password) == (None, None)
    assert s.log_level.lower() == "info"
    assert PEER_ID_PATTERN.fullmatch(s.peer_id) and s.peer_id.startswith("peer-")


def test_dataset_facts_come_from_data_and_partition():
    assert (Settings().seed, Settings().alpha) == (data.DEFAULT_SEED, partition.DEFAULT_ALPHA)
    for name in data.DATASETS:
        assert load_settings([f"--dataset={name}"], {}).dataset == name
    for scheme in partition.SCHEMES:
        assert load_settings([f"--partition={scheme}"], {}).partition == scheme


def test_the_default_model_is_the_datasets_and_is_recorded():
    assert load_settings(["--dataset=cifar10"], {}).model == "cifar10-cnn"
    assert load_settings(["--dataset=fashion-mnist"], {}).public_dict()["model"] == "cnn-small"
    assert load_settings(["--dataset=cifar10", "--model=seed-cnn"], {}).model == "seed-cnn"
    assert load_settings([], {"FL_MODEL": "mymodels:build"}).model == "mymodels:build"


def test_a_bad_model_names_the_built_ins_and_the_forms():
    with pytest.raises(SettingsError) as err:
        load_settings(["--model=nonsense"], {})
    assert str(err.value).startswith(
        "--model: 'nonsense' is not a built-in model (cnn-small | seed-cnn | cifar10-cnn | fedavg-cnn) nor MODULE:FUNCTION"
    )
    assert "FILE.py:FUNCTION" in str(err.value)


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (whole_number(1), "x", "'x' is not a whole number"),
        (whole_number(1), "0", "must be at least 1, got 0"),
        (whole_number(0), "-3", "must not be negative, got -3"),
        (whole_number(1, 9), "10", "must be at most 9, got 10"),
        (number(), "x", "'x' is not a number"),
        (number(), "nan", "must be a finite number, got 'nan'"),
        (number(0, low_open=True), "0", "must be a positive number, got 0"),
        (number(0.05), "0.01", "must be at least 0.05, got 0.01"),
        (number(0, 1), "1.5", "must be between 0 and 1, got 1.5"),
        (number(0, 1, low_open=True, high_open=True), "1", "must be between 0 and 1, 0 and 1 excluded, got 1"),
    ],
)
def test_the_public_number_parsers_say_what_is_wrong(parse, text, message):
    with pytest.raises(SettingsError) as err:
        parse(text)
    assert str(err.value) == message


def test_random_peer_id_differs_between_calls():
    ids = {load_settings([], {}).peer_id for _ in range(20)}
    assert len(ids) == 20
    assert all(PEER_ID_PATTERN.fullmatch(i) for i in ids)


def test_empty_values_mean_unset():
    s = load_settings([], {"FL_PEER_ID": "", "FL_BROKER": "", "FL_TRAINERS": ""})
    assert s.broker == "localhost:1883" and s.trainers == 3 and s.peer_id.startswith("peer-")


def test_unrelated_environment_is_ignored():
    s = load_settings([], {"PEER_ID": "x", "BROKER": "nope:abc", "FL_UNKNOWN": "1", "fl_trainers": "9"})
    assert s.trainers == 3 and s.broker == "localhost:1883"


def test_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("FL_TRAINERS", "6")
    monkeypatch.setenv("FL_PEER_ID", "from-env")
    s = load_settings([])
    assert (s.trainers, s.peer_id) == (6, "from-env")


@pytest.mark.parametrize("flag", list(SAMPLES))
def test_option_by_flag(flag):
    for text, expected in SAMPLES[flag]:
        s = load_settings(as_args({**NEEDS.get(flag, {}), flag: text}), {})
        assert fields_of(s, expected) == expected


@pytest.mark.parametrize("flag", list(SAMPLES))
def test_option_by_env(flag):
    for text, expected in SAMPLES[flag]:
        s = load_settings([], as_env({**NEEDS.get(flag, {}), flag: text}))
        assert fields_of(s, expected) == expected


@pytest.mark.parametrize("flag", list(SAMPLES))
def test_flag_beats_env(flag):
    (env_text, env_expected), (flag_text, flag_expected) = SAMPLES[flag]
    needs = NEEDS.get(flag, {})
    s = load_settings(as_args({**needs, flag: flag_text}), as_env({**needs, flag: env_text}))
    assert fields_of(s, flag_expected) == flag_expected
    # And the other way round, so neither sample wins by accident.
    s = load_settings(as_args({**needs, flag: env_text}), as_env({**needs, flag: flag_text}))
    assert fields_of(s, env_expected) == env_expected


def test_samples_differ_from_defaults():
    defaults = load_settings([], {})
    for flag, samples in SAMPLES.items():
        for _, expected in samples:
            assert fields_of(defaults, expected) != expected, flag


def test_separate_value_form_of_flags():
    s = load_settings(["--trainers", "4", "--shard", "1/2", "--peer-id", "p1"], {})
    assert (s.trainers, s.shard, s.num_shards, s.peer_id) == (4, 1, 2, "p1")


def test_sources_mix():
    s = load_settings(["--trainers=4"], {"FL_MAX_ROUNDS": "7", "FL_TRAINERS": "9"})
    assert (s.trainers, s.max_rounds, s.min_peers) == (4, 7, 5)


# --- bad values -------------------------------------------------------------------------------------------------------

BAD = [
    ("--broker", "nohost:abc"),
    ("--broker", ":1883"),
    ("--broker", "host:0"),
    ("--broker", "host:65536"),
    ("--broker", "host:"),
    ("--broker", "host:-1"),
    ("--peer-id", "has space"),
    ("--peer-id", "a/b"),
    ("--peer-id", "x" * 65),
    ("--peer-id", "peer#1"),
    ("--peer-id", "+"),
    ("--min-peers", "1"),
    ("--min-peers", "abc"),
    ("--min-peers", "2.5"),
    ("--trainers", "0"),
    ("--trainers", "three"),
    ("--min-solutions", "0"),
    ("--evaluators", "-1"),
    ("--evaluators", "ten"),
    ("--max-rounds", "0"),
    ("--max-rounds", "-3"),
    ("--target-accuracy", "1.5"),
    ("--target-accuracy", "-0.1"),
    ("--target-accuracy", "nan"),
    ("--target-accuracy", "high"),
    ("--target-accuracy", "inf"),
    ("--dataset", "imagenet"),
    ("--dataset", "mnist2"),
    ("--shard", "5/5"),
    ("--shard", "-1/3"),
    ("--shard", "a/b"),
    ("--shard", "3"),
    ("--shard", "1/0"),
    ("--shard", "0/0"),
    ("--shard", "1.0/3"),
    ("--partition", "weird"),
    ("--partition", "iid2"),
    ("--model", "nonsense"),
    ("--model", "mymodels"),
    ("--model", "mymodels:"),
    ("--model", "a b:build"),
    ("--model", "dir/x.txt:build"),
    ("--alpha", "0"),
    ("--alpha", "-1"),
    ("--alpha", "nan"),
    ("--alpha", "x"),
    ("--seed", "-1"),
    ("--seed", "1e3"),
    ("--train-samples", "0"),
    ("--test-samples", "0"),
    ("--test-samples", "many"),
    ("--epochs", "0"),
    ("--batch-size", "0"),
    ("--topic-prefix", "a//b"),
    ("--topic-prefix", "/lead"),
    ("--topic-prefix", "trail/"),
    ("--topic-prefix", "a/#"),
    ("--topic-prefix", "a/+/b"),
    ("--topic-prefix", "has space"),
    ("--keepalive", "0"),
    ("--keepalive", "abc"),
    ("--keepalive", "1.5"),
    ("--heartbeat", "0.01"),
    ("--heartbeat", "abc"),
    ("--heartbeat", "nan"),
    ("--election-window", "0"),
    ("--round-deadline", "0.1"),
    ("--round-deadline", "-5"),
    ("--aggregation", "mean"),
    ("--wait-timeout", "0"),
    ("--wait-timeout", "inf"),
    ("--run-id", "a/b"),
    ("--run-id", "x" * 65),
    ("--run-id", "#"),
    ("--wire-dtype", "float64"),
    ("--wire-dtype", "int8"),
    ("--wire-dtype", "16"),
    ("--max-message-bytes", "65535"),
    ("--max-message-bytes", "16777217"),
    ("--max-message-bytes", "16MiB"),
    ("--log-level", "verbose"),
]


@pytest.mark.parametrize("flag, text", BAD)
def test_bad_value_by_flag_names_the_flag(flag, text):
    with pytest.raises(SettingsError) as err:
        load_settings([f"{flag}={text}"], {})
    assert str(err.value).startswith(flag)


@pytest.mark.parametrize("flag, text", BAD)
def test_bad_value_by_env_names_the_variable(flag, text):
    env = FLAG_TO_ENV[flag]
    with pytest.raises(SettingsError) as err:
        load_settings([], {env: text})
    assert str(err.value).startswith(env)


def test_bad_env_value_is_ignored_when_the_flag_overrides_it():
    assert load_settings(["--trainers=2"], {"FL_TRAINERS": "zero"}).trainers == 2


@pytest.mark.parametrize(
    "flag, text",
    [
        ("--heartbeat", "inf"),
        ("--heartbeat", "1e999"),
        ("--election-window", "inf"),
        ("--keepalive", "65536"),
        ("--keepalive", "100000"),
    ],
)
def test_values_no_timer_or_mqtt_can_use_are_refused(flag, text):
    # An infinite heartbeat means a silent controller is never noticed and a new peer's join grace never ends; an
    # infinite election window means nobody ever claims. MQTT packs keepalive into 16 bits, so paho fails building
    # CONNECT for anything above 65535.
    with pytest.raises(SettingsError, match=flag):
        load_settings([f"{flag}={text}"], {})


def test_password_without_username():
    with pytest.raises(SettingsError, match="password"):
        load_settings(["--password=x"], {})
    with pytest.raises(SettingsError, match="PASSWORD|password"):
        load_settings([], {"FL_PASSWORD": "x"})


# --- public_dict ------------------------------------------------------------------------------------------------------


def test_public_dict_hides_password_and_is_json():
    s = load_settings(["--username=alice", "--password=hunter2", "--data-dir=/tmp/d", "--shard=1/4"], {})
    public = s.public_dict()
    text = json.dumps(public)
    assert "hunter2" not in text and "hunter2" not in repr(s)
    assert public["password"] == "***"
    assert public["username"] == "alice"
    assert public["broker"] == "localhost:1883"
    assert public["shard"] == "1/4"
    assert public["data_dir"] == "/tmp/d" and public["run_dir"] == "runs/latest"
    assert json.loads(text) == public


def test_public_dict_without_password():
    public = load_settings([], {}).public_dict()
    assert public["password"] is None
    json.dumps(public)
    assert {"broker", "shard", "peer_id"} <= set(public)


# --- python -m peer ---------------------------------------------------------------------------------------------------


def run_peer(*args, env=None, timeout=60, python_flags=()):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *python_flags, "-m", "peer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )
    return result, time.monotonic() - started


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_help_lists_every_flag_and_variable():
    result, elapsed = run_peer("--help")
    assert result.returncode == 0, result.stderr
    for flag, env, *_ in OPTIONS:
        assert flag in result.stdout, flag
        assert env in result.stdout, env
    assert elapsed < 10


@pytest.mark.parametrize(
    "args, env, names",
    [
        (["--bogus"], {}, "--bogus"),
        (["--broker", "nohost:abc"], {}, "--broker"),
        ([], {"FL_BROKER": "nohost:abc"}, "FL_BROKER"),
        (["--shard", "5/5"], {}, "--shard"),
        (["--trainers"], {}, "--trainers"),
        (["--model", "nonsense"], {}, "--model: 'nonsense' is not a built-in model"),
        ([], {"FL_MODEL": "nonsense"}, "FL_MODEL: 'nonsense' is not a built-in model"),
    ],
)
def test_bad_settings_exit_2_with_one_clear_line(args, env, names):
    result, elapsed = run_peer(*args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert elapsed < 10


def test_bad_settings_do_not_import_tensorflow():
    result, _ = run_peer("--broker", "nohost:abc", python_flags=("-X", "importtime"))
    assert result.returncode == 2
    assert "tensorflow" not in result.stderr and "keras" not in result.stderr


def test_missing_dataset_exits_2_and_says_how_to_get_it(tmp_path):
    result, _ = run_peer(
        "--dataset", "mnist", "--data-dir", "/nonexistent", "--run-dir", str(tmp_path / "run"), timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "/nonexistent" in result.stderr
    assert "how to get it" in result.stderr.lower()


# --- the federation secret --------------------------------------------------------------------------------------------


def test_the_secret_comes_from_a_file_or_fl_secret_and_is_never_shown(tmp_path):
    path = tmp_path / "federation.key"
    path.write_bytes(b"0123456789abcdef0123\n")
    settings = load_settings(["--secret-file", str(path)], environ={})
    assert settings.secret == b"0123456789abcdef0123" and settings.secret_file == path
    assert "0123456789" not in repr(settings) and settings.public_dict()["secret"] == "***"
    assert load_settings([], environ={"FL_SECRET": "s" * 16}).secret == b"s" * 16
    assert load_settings([], environ={}).secret is None


@pytest.mark.parametrize("content, words", [(b"", "is empty"), (b"short", "needs at least 16"), (None, "cannot read")])
def test_a_bad_secret_file_is_a_one_line_error_naming_the_flag(tmp_path, content, words):
    path = tmp_path / "federation.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError, match=f"--secret-file: .*{words}"):
        load_settings(["--secret-file", str(path)], environ={})


def test_a_secret_given_two_ways_or_too_short_in_the_environment_is_refused(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(b"x" * 32)
    with pytest.raises(SettingsError, match="give the secret one way"):
        load_settings(["--secret-file", str(path)], environ={"FL_SECRET": "y" * 32})
    with pytest.raises(SettingsError, match="FL_SECRET: .*needs at least 16"):
        load_settings([], environ={"FL_SECRET": "short"})


def test_resume_is_a_switch_its_variable_a_yes_or_no():
    assert load_settings([], {}).resume is False
    assert load_settings(["--resume"], {}).resume is True
    assert load_settings([], {"FL_RESUME": "yes"}).resume is True
    assert load_settings([], {"FL_RESUME": "0"}).resume is False
    assert load_settings(["--resume"], {"FL_RESUME": "no"}).resume is True  # the flag wins
    with pytest.raises(SettingsError, match="FL_RESUME: 'maybe' is not yes or no"):
        load_settings([], {"FL_RESUME": "maybe"})
