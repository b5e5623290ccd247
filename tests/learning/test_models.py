"""--model: the built-ins, a user's factory from a module or a file, every way a spec can fail (one clear ModelError
naming the value and the fix), and the fingerprint that tells whether two peers hold the same architecture."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peer.learning import models
from peer.learning.data import DATASETS, SHAPES, Shard
from peer.learning.learner import Learner
from peer.learning.models import BUILT_INS, ModelError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "docs/examples/custom_model.py"

# A user's file holding one factory per way a model can be wrong (and a few right ones).
USER_MODELS = """
import keras
from keras import layers

def _head(model, **compile_args):
    model.compile(**{"optimizer": "sgd", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
                     **compile_args})
    return model

def mlp(input_shape, num_classes):
    return _head(keras.Sequential([keras.Input(input_shape), layers.Flatten(), layers.Dense(num_classes,
                                   activation="softmax")]))

def metric_object(input_shape, num_classes):
    return _head(mlp(input_shape, num_classes), metrics=[keras.metrics.SparseCategoricalAccuracy()])

def boom(input_shape, num_classes):
    raise RuntimeError("boom")

def no_arguments():
    return None

def not_a_model(input_shape, num_classes):
    return {"layers": 3}

def not_compiled(input_shape, num_classes):
    return keras.Sequential([keras.Input(input_shape), layers.Flatten(), layers.Dense(num_classes)])

def no_loss(input_shape, num_classes):
    model = not_compiled(input_shape, num_classes)
    model.compile(optimizer="sgd")
    return model

def no_accuracy(input_shape, num_classes):
    return _head(mlp(input_shape, num_classes), metrics=[])

def no_input(input_shape, num_classes):
    return _head(keras.Sequential([layers.Flatten(), layers.Dense(num_classes)]))

def wrong_input(input_shape, num_classes):
    return mlp((32, 32, 3), num_classes)

def wrong_classes(input_shape, num_classes):
    return mlp(input_shape, 5)

NOT_CALLABLE = 3
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_models.py"
    path.write_text(USER_MODELS)
    return path


def tiny_shard(dataset: str) -> Shard:
    rng = np.random.default_rng(0)
    shape, y = SHAPES[dataset], np.arange(20) % 10
    return Shard(
        dataset,
        rng.random((20, *shape), dtype=np.float32),
        y,
        rng.random((20, *shape), dtype=np.float32),
        y,
        10,
        "test",
    )


# --- the spec's form and the defaults: no Keras needed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("seed-cnn", models.Spec("seed-cnn", builtin="seed-cnn")),
        (" Cifar10-CNN ", models.Spec("cifar10-cnn", builtin="cifar10-cnn")),
        ("mymodels:build", models.Spec("mymodels:build", module="mymodels", function="build")),
        ("pkg.sub.mod:make_model", models.Spec("pkg.sub.mod:make_model", module="pkg.sub.mod", function="make_model")),
        (
            "docs/examples/custom_model.py:build_model",
            models.Spec("docs/examples/custom_model.py:build_model", path=Path(EXAMPLE), function="build_model"),
        ),
        ("model.py:f", models.Spec("model.py:f", path=Path("model.py"), function="f")),
    ],
)
def test_a_spec_is_a_built_in_a_module_or_a_file(text, expected):
    assert models.parse_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "nonsense",
        "cnn",
        "mymodels",
        "mymodels:",
        ":build",
        "my models:build",
        "a..b:build",
        "mymodels:not-a-name",
        "mymodels:class",
        "models/x.txt:build",
        "model.py",
        "",
    ],
)
def test_a_bad_spec_names_the_built_ins_and_the_forms(text):
    with pytest.raises(ModelError) as err:
        models.parse_spec(text)
    message = str(err.value)
    assert repr(text) in message
    assert all(name in message for name in BUILT_INS)
    assert "MODULE:FUNCTION" in message and "FILE.py:FUNCTION" in message


def test_each_dataset_defaults_to_the_model_it_had_before_model_existed():
    assert {d: models.default_model(d) for d in DATASETS} == {
        "mnist": "cnn-small",
        "fashion-mnist": "cnn-small",
        "cifar10": "cifar10-cnn",
    }
    assert models.defaults_text() == "cifar10-cnn for cifar10, cnn-small otherwise"


def test_the_settings_check_a_spec_without_importing_tensorflow():
    code = (
        "import sys; from peer.config import load_settings; "
        "assert load_settings(['--model=seed-cnn'], {}).model == 'seed-cnn'; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the fingerprint: pure --------------------------------------------------------------------------------------------

TENSORS = [((3, 3, 1, 16), "float32"), ((16,), "float32"), ((400, 10), "float32"), ((10,), "float32")]


def test_the_fingerprint_is_short_hex_and_stable():
    value = models.fingerprint(TENSORS)
    assert len(value) == 16 and int(value, 16) >= 0
    # Peers of different installs must agree, so the digest's input is pinned: compact JSON of [shape, dtype] pairs.
    text = '[[[3,3,1,16],"float32"],[[16],"float32"],[[400,10],"float32"],[[10],"float32"]]'
    assert value == hashlib.sha256(text.encode()).hexdigest()[:16] == "49764ff2ffbd063b"
    as_numpy = [(np.zeros(shape).shape, np.dtype(dtype)) for shape, dtype in TENSORS]
    assert models.fingerprint(as_numpy) == value
    assert models.fingerprint([(list(shape), dtype) for shape, dtype in TENSORS]) == value


@pytest.mark.parametrize(
    "changed",
    [
        [((3, 3, 1, 32), "float32"), *TENSORS[1:]],  # another shape
        [((3, 3, 1, 16), "float16"), *TENSORS[1:]],  # another dtype
        [TENSORS[1], TENSORS[0], *TENSORS[2:]],  # another order
        TENSORS[:-1],  # a tensor fewer
        [*TENSORS, ((10,), "float32")],  # a tensor more
        [((3, 3, 16), "float32"), *TENSORS[1:]],  # the same numbers, another rank
    ],
)
def test_any_other_architecture_has_another_fingerprint(changed):
    assert models.fingerprint(changed) != models.fingerprint(TENSORS)


def test_describe():
    assert models.describe("mine", TENSORS) == "mine, 4 tensors, 4,170 parameters"
    assert models.describe("empty", []) == "empty, 0 tensors, 0 parameters"


def test_the_accuracy_is_read_under_any_of_its_metric_names():
    assert models.accuracy_of({"loss": 2.0, "accuracy": 0.5}) == 0.5
    assert models.accuracy_of({"loss": 2.0, "acc": 0.25}) == 0.25
    assert models.accuracy_of({"sparse_categorical_accuracy": 0.75, "loss": 1.0}) == 0.75


# --- the built-ins ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_INS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_built_in_fits_every_dataset(name, dataset):
    model = models.build(name, SHAPES[dataset], 10, seed=0)
    assert model.input_shape == (None, *SHAPES[dataset]) and model.output_shape == (None, 10)
    assert model.compiled and model.loss == "sparse_categorical_crossentropy"


def test_seed_cnn_is_the_seed_documents_cnn():
    model = models.build("seed-cnn", SHAPES["mnist"], 10, seed=0)
    layers = [(type(layer).__name__, layer.get_config()) for layer in model.layers]
    assert [kind for kind, _ in layers] == [
        "Conv2D",
        "Conv2D",
        "MaxPooling2D",
        "Dropout",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    (_, conv1), (_, conv2), (_, pool), (_, drop1), _, (_, dense1), (_, drop2), (_, dense2) = layers
    assert (conv1["filters"], conv1["kernel_size"], conv1["activation"]) == (32, (3, 3), "relu")
    assert (conv2["filters"], conv2["kernel_size"], conv2["activation"]) == (64, (3, 3), "relu")
    assert pool["pool_size"] == (2, 2) and (drop1["rate"], drop2["rate"]) == (0.25, 0.5)
    assert (dense1["units"], dense1["activation"]) == (128, "relu")
    assert (dense2["units"], dense2["activation"]) == (10, "softmax")
    assert type(model.optimizer).__name__ == "SGD"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    assert model.get_compile_config()["metrics"] == ["accuracy"]
    assert model.count_params() == 1_199_882


def test_a_learner_runs_the_datasets_default_unless_told_otherwise():
    assert Learner("mnist", None).model_name == "cnn-small"
    assert Learner("cifar10", None).model_name == "cifar10-cnn"
    assert Learner("mnist", None, model="Seed-CNN").model_name == "seed-cnn"
    with pytest.raises(ModelError):
        Learner("mnist", None, model="nonsense")


def test_peers_with_the_same_model_share_a_fingerprint_and_other_models_differ():
    default = Learner("mnist", None, seed=1)
    assert default.fingerprint() == Learner("fashion-mnist", None, seed=2, model="cnn-small").fingerprint()
    others = [
        Learner("mnist", None, model="seed-cnn"),
        Learner("cifar10", None, model="cnn-small"),
        Learner("mnist", None, model="cifar10-cnn"),
    ]
    assert len({default.fingerprint(), *(learner.fingerprint() for learner in others)}) == 4
    # The weights as the learner hands them out (float32, the wire's type) fingerprint alike.
    assert default.fingerprint() == models.fingerprint((w.shape, w.dtype) for w in default.initial_weights())
    assert others[0].model_description() == "seed-cnn, 8 tensors, 1,199,882 parameters"
    assert default.model_description() == "cnn-small, 8 tensors, 56,714 parameters"


# --- a user's model ---------------------------------------------------------------------------------------------------


def test_the_example_file_loads_by_path_and_as_a_module(monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented path is relative to the repository's root, where peers run
    by_path = models.build(f"{EXAMPLE}:build_model", SHAPES["fashion-mnist"], 10, seed=5)
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    by_module = models.build("custom_model:build_model", SHAPES["fashion-mnist"], 10, seed=5)
    assert by_path.output_shape == (None, 10)
    assert all(np.array_equal(a, b) for a, b in zip(by_path.get_weights(), by_module.get_weights()))


def test_big_dense_is_about_100_mb_of_float32():
    # About a second and 300 MB to build; it is never trained here.
    model = models.build(f"{ROOT / EXAMPLE}:big_dense", SHAPES["mnist"], 10, seed=0)
    assert model.count_params() == 784 * 32000 + 32000 + 32000 * 10 + 10
    assert type(model.optimizer).__name__ == "SGD"
    del model


def test_a_user_model_trains_with_its_own_accuracy_metric_and_is_seeded(user_file):
    spec = f"{user_file}:metric_object"
    learner = Learner("mnist", tiny_shard("mnist"), batch_size=10, seed=3, model=spec)
    accuracy, loss, samples = learner.evaluate(learner.initial_weights())
    assert 0.0 <= accuracy <= 1.0 and np.isfinite(loss) and samples == 20
    same = Learner("mnist", None, seed=3, model=spec).initial_weights()
    other = Learner("mnist", None, seed=4, model=spec).initial_weights()
    assert all(np.array_equal(a, b) for a, b in zip(learner.initial_weights(), same))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other))


def test_a_module_on_the_path_is_imported(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    model = models.build("my_models:mlp", SHAPES["cifar10"], 10, seed=0)
    assert model.input_shape == (None, 32, 32, 3)


@pytest.mark.parametrize(
    "function, words",
    [
        ("missing", ["has no function missing", "its functions: ", "mlp", "boom"]),
        ("NOT_CALLABLE", ["NOT_CALLABLE", "is a int, not a function"]),
        ("boom", ["boom(input_shape=(28, 28, 1), num_classes=10) failed: RuntimeError: boom"]),
        ("no_arguments", ["failed: TypeError"]),
        ("not_a_model", ["returned dict, not a Keras model", "model.compile"]),
        ("not_compiled", ["not compiled", "model.compile(optimizer="]),
        ("no_loss", ["not compiled with a loss"]),
        ("no_accuracy", ["accuracy metric", "metrics=['accuracy']"]),
        ("no_input", ["no defined input", "keras.Input(input_shape)", "(28, 28, 1)"]),
        ("wrong_input", ["inputs of shape (32, 32, 3)", "images are (28, 28, 1)", "input_shape argument"]),
        ("wrong_classes", ["outputs shape (5,)", "10 classes", "Dense(num_classes"]),
    ],
)
def test_a_model_that_cannot_be_used_is_one_clear_error(user_file, function, words):
    spec = f"{user_file}:{function}"
    with pytest.raises(ModelError) as err:
        models.build(spec, SHAPES["mnist"], 10, seed=0)
    message = str(err.value)
    assert message.startswith(f"--model {spec}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_a_missing_file_or_module_or_a_broken_one_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "nowhere/models.py:build": "there is no file nowhere/models.py",
        "no_such_module_for_fl:build": "no module named no_such_module_for_fl",
        "broken.py:build": "running broken.py failed: SyntaxError",
        "needs_more:build": "importing needs_more failed: ModuleNotFoundError: No module named "
        "'a_dependency_nobody_has'",
        "raises.py:build": "running raises.py failed: ValueError: bad config",
    }
    (tmp_path / "broken.py").write_text("def build(:\n")
    (tmp_path / "needs_more.py").write_text("import a_dependency_nobody_has\n")
    (tmp_path / "raises.py").write_text("raise ValueError('bad\\n config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, words in cases.items():
        with pytest.raises(ModelError) as err:
            models.build(spec, SHAPES["mnist"], 10, seed=0)
        assert str(err.value).startswith(f"--model {spec}: ") and words in str(err.value), spec
        assert "\n" not in str(err.value)


# --- python -m peer ---------------------------------------------------------------------------------------------------


def test_the_peer_exits_2_with_one_line_when_the_model_cannot_be_loaded(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(USER_MODELS)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer",
            "--model",
            f"{user}:wrong_classes",
            "--dataset",
            "fashion-mnist",
            "--train-samples",
            "20",
            "--test-samples",
            "20",
            "--run-dir",
            str(tmp_path / "run"),
            "--broker",
            "127.0.0.1:9",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
    )
    if "How to get it" in result.stderr:
        pytest.skip("Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"python -m peer: error: --model {user}:wrong_classes: the model outputs shape (5,), but the "
        "dataset has 10 classes; end it with Dense(num_classes, activation='softmax')"
    ]
