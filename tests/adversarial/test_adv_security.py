"""Crafted data files must never run code: CIFAR batches go through a restricted unpickler."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gdscope.errors import InvalidArgumentError
from gdscope.zoo import cifar10, cifar100, load_dataset
from gdscope.zoo.data import _unpickle

SRC = Path(__file__).resolve().parents[2] / "src" / "gdscope"


class _Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _batch(n: int = 2, labels=None) -> dict:
    data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072).astype(np.uint8)
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"data": data,
        b"labels": list(range(n)) if labels is None else labels,
    }


def _write(path: Path, obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _payloads(marker: Path) -> dict[str, object]:
    """Ways a pickle can try to create ``marker`` (each would succeed under pickle.load)."""
    m = str(marker)
    return {
        "builtins.open": _Reduce(builtins.open, m, "w"),
        "os.system": _Reduce(os.system, f"touch {m}"),
        "subprocess.call": _Reduce(subprocess.call, ["touch", m]),
        "builtins.exec": _Reduce(builtins.exec, f"open({m!r}, 'w').close()"),
        "builtins.eval": _Reduce(builtins.eval, f"open({m!r}, 'w')"),
        "pathlib.touch": _Reduce(Path.touch, Path(m)),
        "np.save": _Reduce(np.save, m, np.zeros(1)),
        "torch.save": _Reduce(torch.save, 1, m),
    }


PAYLOADS = list(_payloads(Path("x")))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("placement", ["top", "data", "labels", "object-array"])
def test_malicious_cifar_batch_refused_and_runs_nothing(tmp_path, payload, placement):
    marker = tmp_path / "pwned"
    evil = _payloads(marker)[payload]
    d = _batch()
    if placement == "top":
        obj = evil
    elif placement == "object-array":
        obj = {**d, b"data": np.array([evil, 1], dtype=object)}
    else:
        obj = {**d, placement.encode(): evil}
    path = _write(tmp_path / "cifar-10-batches-py" / "test_batch", obj)
    with pytest.raises(InvalidArgumentError, match=r"refers to the global") as e:
        cifar10(tmp_path, train=False)
    msg = str(e.value)
    assert str(path) in msg  # names the file
    assert re.search(r"the global \S+\.\S+", msg)  # and the forbidden global
    assert not marker.exists()  # and nothing ran


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_any_protocol(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "f", {b"data": _Reduce(os.system, f"touch {marker}")}, protocol)
    with pytest.raises(InvalidArgumentError, match=r"system"):
        _unpickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_name",
    [
        b"numpy\nload",  # in the numpy namespace, but not a reconstructor
        b"numpy.core.multiarray\nfromfile",
        b"numpy._core.multiarray\nfrombuffer",
        b"numpy.lib.npyio\nload",
        b"builtins\ngetattr",
        b"copyreg\n_reconstructor",
        b"torch\nload",
        b"posix\nsystem",
    ],
)
def test_forbidden_global_named(tmp_path, global_name):
    """Hand-written protocol-0 pickles: GLOBAL then an empty-tuple call (REDUCE)."""
    raw = b"c" + global_name + b"\n(tR."
    path = tmp_path / "cifar-100-python" / "test"
    path.parent.mkdir()
    path.write_bytes(raw)
    module, name = global_name.decode().split("\n")
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{module}.{name}")) as e:
        cifar100(tmp_path, train=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"", r"cannot unpickle"),
        (b"not a pickle at all", r"cannot unpickle"),
        (pickle.dumps(_batch())[:50], r"cannot unpickle"),
        (pickle.dumps([1, 2, 3]), r"holds a list, not the dict"),
        (pickle.dumps(b"bytes"), r"holds a bytes"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), r"no 'labels' entry"),
        (pickle.dumps({**_batch(), b"labels": ["cat", "dog"]}), r"'labels' is not a list"),
        (pickle.dumps({**_batch(), b"labels": [0, 10]}), r"labels in\s+0\.\.9"),
        (pickle.dumps({**_batch(), b"data": np.zeros((2, 3072), np.float32)}), r"'data' is"),
    ],
    ids=["empty", "garbage", "truncated", "list", "bytes", "no-labels", "str-labels",
         "label-range", "float-data"],
)  # fmt: skip
def test_corrupt_cifar_batches(tmp_path, raw, pattern):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(raw)
    with pytest.raises(InvalidArgumentError, match=pattern) as e:
        cifar10(tmp_path, train=False)
    assert "test_batch" in str(e.value)


# ---------------------------------------------------------------------- legitimate files still load
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("labels", ["list", "ndarray"])
def test_legitimate_cifar_batch_loads(tmp_path, protocol, labels):
    d = _batch(4, labels=[3, 1, 4, 1] if labels == "list" else np.array([3, 1, 4, 1]))
    _write(tmp_path / "cifar-10-batches-py" / "test_batch", d, protocol)
    X, y = cifar10(tmp_path, train=False, one_hot=False, dtype=torch.float64)
    assert X.shape == (4, 3, 32, 32) and torch.isfinite(X).all()
    assert y.tolist() == [3, 1, 4, 1]
    X2, Y2 = load_dataset("cifar10", root=tmp_path, train=False, n=2)
    assert X2.shape == (2, 3, 32, 32) and Y2.shape == (2, 10)


def test_python2_style_numpy_core_names_load(tmp_path):
    """The original CIFAR files name numpy.core.multiarray (NumPy 1 / Python 2 pickles)."""
    raw = pickle.dumps(_batch(3), protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(raw)
    X, y = cifar10(tmp_path, train=False, one_hot=False)
    assert X.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]


def test_cifar100_legitimate_with_numpy_scalars(tmp_path):
    d = {
        b"data": np.zeros((2, 3072), np.uint8),
        b"fine_labels": [np.int64(5), np.int64(99)],
        b"coarse_labels": [np.int64(1), np.int64(19)],
    }
    _write(tmp_path / "cifar-100-python" / "test", d)
    _, y = cifar100(tmp_path, train=False, one_hot=False)
    assert y.tolist() == [5, 99]


# ---------------------------------------------------------------------- no other unpickling
#: Every source file: a module split or added later is scanned too.
SOURCES = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("rel", SOURCES)
def test_no_unrestricted_deserialization(rel):
    text = (SRC / rel).read_text()
    assert not re.search(r"pickle\.loads?\(", text), "use the restricted unpickler"
    assert not re.search(r"allow_pickle\s*=\s*True", text)
    for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
        assert "weights_only=True" in call.group(1)
    for mod in ("dill", "cloudpickle", "joblib", "shelve", "marshal"):
        assert not re.search(rf"^\s*(import|from) {mod}\b", text, re.M)
