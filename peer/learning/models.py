"""The models a federation can train: the built-ins, a user's factory named by --model, and the fingerprint that tells
whether two peers hold the same architecture.

A model is named by a spec: a built-in name (BUILT_INS), `module:function` (an importable module) or
`path/to/file.py:function`. The function is called as `function(input_shape, num_classes)` and returns a compiled
Keras model; the built-ins are such functions too. Every way a spec can fail to give a usable model raises
ModelError, whose message names the --model value and the fix.

Keras is imported lazily, on the first build: the settings check a spec's form with `check_spec` before TensorFlow
would have loaded, and the fingerprint of a list of (shape, dtype) needs no Keras at all.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import keyword
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peer.wire.weights import FINGERPRINT_HEX  # the length init and heartbeat carry

_DATASET_DEFAULTS = {"cifar10": "cifar10-cnn"}
_FALLBACK_DEFAULT = "cnn-small"
# The metric names Learner.evaluate reads the accuracy from (what metrics=["accuracy"], ["acc"] or
# [SparseCategoricalAccuracy()] produce).
ACCURACY_METRICS = ("accuracy", "acc", "sparse_categorical_accuracy")

FORMS = (
    "MODULE:FUNCTION (an importable module, e.g. mymodels:build) or FILE.py:FUNCTION "
    "(e.g. docs/examples/custom_model.py:build_model), where FUNCTION(input_shape, num_classes) returns a "
    "compiled Keras model"
)


class ModelError(ValueError):
    """--model names nothing that gives a usable model; the message names the value and the fix."""


def default_model(dataset: str) -> str:
    """The built-in a dataset trains when --model is not given (the models the peer had before --model existed)."""
    return _DATASET_DEFAULTS.get(dataset, _FALLBACK_DEFAULT)


def defaults_text() -> str:
    """The default rule in words, for the help: e.g. "cifar10-cnn for cifar10, cnn-small otherwise"."""
    return ", ".join(
        [*(f"{model} for {dataset}" for dataset, model in _DATASET_DEFAULTS.items()), f"{_FALLBACK_DEFAULT} otherwise"]
    )


@dataclass(frozen=True)
class Spec:
    """A --model value, taken apart: a built-in name, or where to find a factory function (module or file)."""

    text: str
    builtin: str | None = None
    module: str | None = None
    path: Path | None = None
    function: str | None = None


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def parse_spec(text: str) -> Spec:
    """The spec's form, checked without importing anything; ModelError says which forms exist."""
    value = text.strip()
    if value.lower() in BUILT_INS:
        return Spec(value.lower(), builtin=value.lower())
    source, colon, function = value.rpartition(":")
    if colon and source and _is_identifier(function):
        if source.endswith(".py"):
            return Spec(value, path=Path(source), function=function)
        if all(_is_identifier(part) for part in source.split(".")):
            return Spec(value, module=source, function=function)
    raise ModelError(f"{text!r} is not a built-in model ({' | '.join(BUILT_INS)}) nor {FORMS}")


def check_spec(text: str) -> str:
    """The --model value as the settings keep it (a built-in's name in lower case); ModelError for a bad form."""
    return parse_spec(text).text


# --- the fingerprint: pure, over the weight tensors' shapes and dtypes -------------------------------------------------


def _dtype_name(dtype) -> str:
    return str(getattr(dtype, "name", dtype))  # numpy and TensorFlow dtypes have .name; Keras gives strings


def _canonical(tensors: Iterable[tuple[Sequence[int], object]]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(int(n) for n in shape), _dtype_name(dtype)) for shape, dtype in tensors]


def fingerprint(tensors: Iterable[tuple[Sequence[int], object]]) -> str:
    """A short hex digest of the architecture as the weights show it: every tensor's shape and dtype, in order (not
    its values, so training never changes it). Peers with the same --model and dataset get the same one."""
    text = json.dumps([[list(shape), dtype] for shape, dtype in _canonical(tensors)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_HEX]


def describe(name: str, tensors: Iterable[tuple[Sequence[int], object]]) -> str:
    """One line for people: e.g. "seed-cnn, 8 tensors, 1,199,882 parameters"."""
    canonical = _canonical(tensors)
    parameters = sum(_product(shape) for shape, _ in canonical)
    return f"{name}, {len(canonical)} tensors, {parameters:,} parameters"


def _product(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def tensors_of(model) -> list[tuple[tuple[int, ...], str]]:
    """A Keras model's weight tensors as (shape, dtype), in get_weights() order."""
    return [(tuple(variable.shape), _dtype_name(variable.dtype)) for variable in model.weights]


# --- Keras and the built-ins -------------------------------------------------------------------------------------------

_configured = False
_threads = (1, 1)  # TensorFlow's intra-op and inter-op pools in this process


def configure_threads(intra: int, inter: int = 1) -> None:
    """The threads TensorFlow's pools get in this process: the learning service sizes them to the machine; a process
    that imports Keras without it keeps one of each. Effective only before Keras is first imported."""
    global _threads
    _threads = (intra, inter)


def keras_module():
    """Import Keras with TensorFlow's thread pools sized as configured (`configure_threads`)."""
    global _configured
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN stays on (TensorFlow's default): it halves the CPU time of a convolutional model's fit. Its start-up
    # notice bypasses TF_CPP_MIN_LOG_LEVEL; the learning service, the one process that imports TensorFlow, keeps
    # it out of the logs (peer.learning.service).
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    if not _configured:
        tf.config.threading.set_intra_op_parallelism_threads(_threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(_threads[1])
        _configured = True
    return keras


def _classifier(input_shape: tuple, num_classes: int, body: list, optimizer):
    keras = keras_module()
    model = keras.Sequential([keras.Input(input_shape), *body, keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def cnn_small(input_shape: tuple, num_classes: int):
    """About 57k parameters on 28x28 inputs: the default for mnist and fashion-mnist."""
    keras = keras_module()
    layers = keras.layers
    body = [
        layers.Conv2D(16, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
    ]
    return _classifier(input_shape, num_classes, body, keras.optimizers.Adam(1e-3))


def seed_cnn(input_shape: tuple, num_classes: int):
    """The CNN of the seed documents (the FedAvg notebook): about 1.2M parameters on 28x28 inputs, plain SGD."""
    keras = keras_module()
    layers = keras.layers
    body = [
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
    ]
    return _classifier(input_shape, num_classes, body, keras.optimizers.SGD(learning_rate=0.01))


def cifar10_cnn(input_shape: tuple, num_classes: int):
    """About 325k parameters on 32x32x3 inputs: the default for cifar10."""
    keras = keras_module()
    layers = keras.layers
    body = [
        layers.Conv2D(32, 3, activation="relu", padding="same"),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dropout(0.3),
        layers.Dense(128, activation="relu"),
    ]
    return _classifier(input_shape, num_classes, body, keras.optimizers.Adam(1e-3))


def fedavg_cnn(input_shape: tuple, num_classes: int):
    """The CNN of the FedAvg paper (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): two 5x5 convolutions of 32 and 64 channels, each followed by 2x2 max pooling, a dense layer
    of 512, softmax: 1,663,370 parameters on 28x28 inputs. Plain SGD, as in the paper (its rate tuned per setting;
    0.05 here)."""
    keras = keras_module()
    layers = keras.layers
    body = [
        layers.Conv2D(32, 5, activation="relu", padding="same"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 5, activation="relu", padding="same"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(512, activation="relu"),
    ]
    return _classifier(input_shape, num_classes, body, keras.optimizers.SGD(learning_rate=0.05))


_FACTORIES: dict[str, Callable] = {
    "cnn-small": cnn_small,
    "seed-cnn": seed_cnn,
    "cifar10-cnn": cifar10_cnn,
    "fedavg-cnn": fedavg_cnn,
}
BUILT_INS = tuple(_FACTORIES)


# --- a user's factory --------------------------------------------------------------------------------------------------


def load_factory(spec: Spec) -> Callable:
    """The function the spec names, imported; ModelError says what is missing and how to fix it."""
    if spec.builtin:
        return _FACTORIES[spec.builtin]
    where, function = f"--model {spec.text}", spec.function or ""
    if spec.path is not None:
        module, place = _import_file(spec.path, where), str(spec.path)
    else:
        module, place = _import_module(spec.module or "", function, where), f"module {spec.module}"
    if not hasattr(module, function):
        found = sorted(
            name
            for name, value in vars(module).items()
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        )
        hint = f" (its functions: {', '.join(found)})" if found else ""
        raise ModelError(f"{where}: {place} has no function {function}{hint}")
    factory = getattr(module, function)
    if not callable(factory):
        raise ModelError(
            f"{where}: {spec.function} in {place} is a {type(factory).__name__}, not a function; name "
            "a function(input_shape, num_classes) that returns a compiled Keras model"
        )
    return factory


def _import_file(path: Path, where: str):
    if not path.is_file():
        raise ModelError(
            f"{where}: there is no file {path} (a relative path counts from the folder the peer runs in, {Path.cwd()})"
        )
    # A name of its own per file, so two files called models.py never share a module; registered before running
    # it, as an import would, so the file's dataclasses and pickling find their module.
    name = f"_fl_user_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelError(f"{where}: {path} cannot be loaded as Python (name a .py file)")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # the user's code may raise anything; one line says what, no traceback
        sys.modules.pop(name, None)
        raise ModelError(f"{where}: running {path} failed: {_one_line(err)}") from None
    return module


def _import_module(name: str, function: str, where: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise ModelError(
                f"{where}: no module named {err.name} (put it in the folder the peer runs in, "
                f"{Path.cwd()}, or on PYTHONPATH; or name a file: path/to/file.py:{function})"
            ) from None
        raise ModelError(f"{where}: importing {name} failed: {_one_line(err)}") from None
    except Exception as err:  # the user's code may raise anything; one line says what, no traceback
        raise ModelError(f"{where}: importing {name} failed: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- building ----------------------------------------------------------------------------------------------------------


def build(spec_text: str, input_shape: tuple, num_classes: int, seed: int):
    """The compiled model the spec names, its weights drawn from `seed`, checked against the dataset's input shape
    and class count. ModelError for anything that would fail later, mid-run."""
    spec = parse_spec(spec_text)
    keras = keras_module()  # before the user's module, which may import Keras itself without the settings above
    factory = load_factory(spec)
    keras.utils.set_random_seed(seed)  # every peer (so every controller) starts the same run from the same model
    try:
        model = factory(tuple(input_shape), int(num_classes))
    except Exception as err:  # the user's code may raise anything; one line says what, no traceback
        raise ModelError(
            f"--model {spec.text}: {spec.function or spec.builtin}(input_shape={tuple(input_shape)}, "
            f"num_classes={num_classes}) failed: {_one_line(err)}"
        ) from None
    check_model(model, spec.text, tuple(input_shape), int(num_classes))
    return model


def check_model(model, spec_text: str, input_shape: tuple, num_classes: int) -> None:
    """ModelError unless the model is a compiled Keras classifier for this dataset, scored by accuracy."""
    keras = keras_module()
    where = f"--model {spec_text}"
    if not isinstance(model, keras.Model):
        raise ModelError(
            f"{where}: the function returned {type(model).__name__}, not a Keras model; return the "
            "keras.Model (e.g. a keras.Sequential) after model.compile(...)"
        )
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        raise ModelError(
            f"{where}: the model is not compiled with a loss; call model.compile(optimizer=..., "
            "loss='sparse_categorical_crossentropy', metrics=['accuracy']) before returning it"
        )
    if not any(_metric_name(metric) in ACCURACY_METRICS for metric in model.get_compile_config().get("metrics") or ()):
        raise ModelError(
            f"{where}: the model is not compiled with an accuracy metric, which the federation's "
            "evaluations report; pass metrics=['accuracy'] to model.compile"
        )
    try:
        inputs, outputs = model.input_shape, model.output_shape
    except (AttributeError, ValueError):
        raise ModelError(
            f"{where}: the model has no defined input; start it with keras.Input(input_shape) so it "
            f"takes the dataset's {input_shape} images"
        ) from None
    if inputs != (None, *input_shape):
        raise ModelError(
            f"{where}: the model takes inputs of shape {_shape(inputs)}, but the dataset's images are "
            f"{input_shape}; build it from the input_shape argument"
        )
    if outputs != (None, num_classes):
        raise ModelError(
            f"{where}: the model outputs shape {_shape(outputs)}, but the dataset has {num_classes} "
            "classes; end it with Dense(num_classes, activation='softmax')"
        )


def _metric_name(metric) -> str | None:
    if isinstance(metric, str):
        return metric
    if isinstance(metric, dict):  # a metric object, serialized by get_compile_config
        return (metric.get("config") or {}).get("name")
    return None


def _shape(shape) -> str:
    return str(tuple(shape)[1:]) if isinstance(shape, tuple) else str(shape)


def accuracy_of(results: dict) -> float:
    """The accuracy among model.evaluate(..., return_dict=True)'s results (check_model made sure there is one)."""
    return float(next(results[name] for name in ACCURACY_METRICS if name in results))
