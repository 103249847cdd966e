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
    markov_chain,
    mnist,
    mnist1d,
    sequence_loader,
    sequences,
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
from gdscope.zoo.transformer import (
    GPT,
    POOLS,
    Block,
    CausalLMOutput,
    SelfAttention,
    ViT,
    gpt,
    vit,
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
    # transformers
    "POOLS",
    "GPT",
    "Block",
    "CausalLMOutput",
    "SelfAttention",
    "ViT",
    "gpt",
    "vit",
    # data
    "DATASETS",
    "as_dataset",
    "cifar10",
    "cifar100",
    "digits",
    "load_dataset",
    "mnist",
    "mnist1d",
    "markov_chain",
    "sequence_loader",
    "sequences",
    "sphere",
]
