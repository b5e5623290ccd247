"""Your own Keras model in a federation: an example for `--model FILE.py:FUNCTION`.

Any function `FUNCTION(input_shape, num_classes)` that returns a *compiled* Keras model will do:

- `input_shape` is the dataset's image shape, e.g. (28, 28, 1) for mnist and fashion-mnist, (32, 32, 3) for cifar10;
  start the model with `keras.Input(input_shape)`.
- `num_classes` is the number of labels (10 for all three); end with `Dense(num_classes, activation="softmax")`.
  Labels are whole numbers, so use `loss="sparse_categorical_crossentropy"`, and pass `metrics=["accuracy"]`:
  every peer reports the global model's accuracy.
- Keras is seeded (`--seed`) just before the call, so every peer builds the same initial weights. Draw any other
  randomness from Keras too.

Run a local federation of three peers with it (from the repository's root; a relative path counts from the folder the
peers run in):

    python -m scripts.localnet --peers 3 -- --dataset fashion-mnist \\
        --model docs/examples/custom_model.py:build_model --max-rounds 3 --train-samples 2000

Every peer must be given the same --model (and the same file). A module on the Python path works as well:
`--model mymodels:build` imports `mymodels` and calls its `build`. The peer checks the model before joining, and a
function that cannot be found, or a model that does not fit the dataset, stops it with one line saying why.

`big_dense` is a plain dense network of about 25 million parameters (about 100 MB of float32 weights on 28x28
images): a model for trying the federation with large messages, e.g.
`--model docs/examples/custom_model.py:big_dense`.
"""

from __future__ import annotations

import keras
from keras import layers


def build_model(input_shape: tuple, num_classes: int) -> keras.Model:
    """A small CNN ending in global average pooling: about 10k parameters on 28x28 images (cnn-small has 57k)."""
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(24, 5, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(64, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def big_dense(input_shape: tuple, num_classes: int) -> keras.Model:
    """Flatten -> Dense 32000 relu -> Dense num_classes: 25.4M parameters on 28x28x1 images, ~100 MB as float32
    (on cifar10's 32x32x3 images 98.7M, ~400 MB)."""
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Flatten(),
            layers.Dense(32000, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model
