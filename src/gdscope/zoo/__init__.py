"""Reference models and data sets (bundled, generated offline, or read from local files).

Nothing is ever downloaded: MNIST and CIFAR are read from files the user placed on disk.
"""

from gdscope.zoo.data import (
    DATASETS,
    as_dataset,
    cifar10,
    cifar100,
    digits,
    load_dataset,
    mnist,
    mnist1d,
    sphere,
)
from gdscope.zoo.models import ACTIVATIONS, PARAMETERIZATIONS, Erf, NTKLinear, cnn, mlp
from gdscope.zoo.resnet import (
    NORMS,
    SHORTCUTS,
    IdentityShortcut,
    ModifiedShortcut,
    PooledShortcut,
    PreActBlock,
    PreActResNet,
    preact_resnet,
)

__all__ = [
    # models
    "ACTIVATIONS",
    "PARAMETERIZATIONS",
    "Erf",
    "NTKLinear",
    "cnn",
    "mlp",
    # residual networks
    "NORMS",
    "SHORTCUTS",
    "IdentityShortcut",
    "ModifiedShortcut",
    "PooledShortcut",
    "PreActBlock",
    "PreActResNet",
    "preact_resnet",
    # data
    "DATASETS",
    "as_dataset",
    "cifar10",
    "cifar100",
    "digits",
    "load_dataset",
    "mnist",
    "mnist1d",
    "sphere",
]
