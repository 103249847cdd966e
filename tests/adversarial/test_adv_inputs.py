"""Adversarial inputs where data enter gdscope: Problem, ntk, ntk_eigs, disparity.

Each bad input gets the exception type from gdscope.errors and a message naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gdscope as gs
from conftest import DT, K_OUT, N, class_data, make_mlp, regression_data
from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from gdscope.kernels.disparity import function_space_disparity

NAN, INF = float("nan"), float("inf")


def _poison(t: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# ====================================================================== non-finite data: Problem
@pytest.mark.parametrize(
    ("where", "index", "value", "pattern"),
    [
        ("x", (0, 0), NAN, r"\bx\b.*NaN at sample 0"),
        ("x", (7, 2), INF, r"\bx\b.*\+inf at sample 7"),
        ("x", (N - 1, 3), -INF, r"\bx\b.*-inf at sample 19"),
        ("targets", (3, 1), NAN, r"targets.*NaN at sample 3"),
        ("targets", (12, 0), INF, r"targets.*\+inf at sample 12"),
        ("targets", (19, 2), -INF, r"targets.*-inf at sample 19"),
    ],
)
def test_problem_nonfinite_tensor_data(where, index, value, pattern):
    X, Y = regression_data()
    if where == "x":
        X = _poison(X, index, value)
    else:
        Y = _poison(Y, index, value)
    with pytest.raises(NonFiniteError, match=pattern):
        gs.Problem(make_mlp(), "mse", (X, Y))


@pytest.mark.parametrize(
    ("where", "sample", "value"),
    [("x", 0, NAN), ("x", 9, INF), ("targets", 5, NAN), ("targets", 11, -INF)],
)
def test_problem_nonfinite_loader_batch_checked_when_used(where, sample, value):
    """A bad sample in a later DataLoader batch is refused as soon as that batch is used."""
    X, Y = regression_data()
    if where == "x":
        X = _poison(X, (sample, 1), value)
    else:
        Y = _poison(Y, (sample, 0), value)
    loader = DataLoader(TensorDataset(X, Y), batch_size=4)
    batch, local = divmod(sample, 4)
    pattern = rf"{where}\b.*batch {batch} of data.*sample {local}\b"
    with pytest.raises(NonFiniteError, match=pattern):
        prob = gs.Problem(make_mlp(), "mse", loader)
        prob.loss()


@pytest.mark.parametrize(
    ("layer", "attr", "index", "value"),
    [(0, "weight", (2, 1), NAN), (2, "bias", (5,), INF), (4, "weight", (0, 0), -INF)],
)
def test_problem_nonfinite_parameters(layer, attr, index, value):
    X, Y = regression_data()
    model = make_mlp()
    with torch.no_grad():
        getattr(model[layer], attr)[index] = value
    with pytest.raises(NonFiniteError, match=rf"parameter '{layer}\.{attr}'"):
        gs.Problem(model, "mse", (X, Y))


# ====================================================================== class labels
@pytest.mark.parametrize(
    ("index", "label"),
    [(0, K_OUT), (5, -1), (19, 100), (10, -100), (3, K_OUT + 7)],
)
def test_problem_class_labels_out_of_range_anywhere(index, label):
    """Every label is checked, not only the first two samples."""
    X, y = class_data()
    y = y.clone()
    y[index] = label
    pattern = rf"targets.*class label {label} at sample {index}\b.*0\.\.{K_OUT - 1}"
    with pytest.raises(InvalidArgumentError, match=pattern):
        gs.Problem(make_mlp(), "cross_entropy", (X, y))


@pytest.mark.parametrize(("sample", "label"), [(2, 3), (13, -2), (19, 9)])
def test_problem_class_labels_out_of_range_in_loader(sample, label):
    X, y = class_data()
    y = y.clone()
    y[sample] = label
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    batch, local = divmod(sample, 6)
    pattern = rf"targets in batch {batch} of data.*class label {label} at sample {local}\b"
    with pytest.raises(InvalidArgumentError, match=pattern):
        gs.Problem(make_mlp(), "cross_entropy", loader).loss()


@pytest.mark.parametrize(
    "targets",
    [
        torch.zeros(N, dtype=DT),  # float class labels
        torch.zeros(N, dtype=torch.float32),
        torch.zeros(N, 1, dtype=DT),
        torch.zeros(N, K_OUT + 1, dtype=DT),
        torch.zeros(N, dtype=torch.bool),
    ],
    ids=["float64-labels", "float32-labels", "float-column", "wrong-width-probs", "bool"],
)
def test_problem_cross_entropy_target_dtype(targets):
    X, _ = class_data()
    with pytest.raises(InvalidArgumentError, match=r"targets.*integer class indices") as e:
        gs.Problem(make_mlp(), "cross_entropy", (X, targets))
    assert not isinstance(e.value, ShapeMismatchError)  # a dtype problem, not a shape one
    assert f"(n, {K_OUT})" in str(e.value)


def _soft(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N, K_OUT, generator=g, dtype=DT), dim=1)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda p: p * 2, r"row 0 sums to"),
        (lambda p: _poison(p, (4, 1), -0.5), r"entry \(4, 1\).*< 0"),
        (lambda p: torch.cat([p[:9], p[9:10] * 0, p[10:]]), r"row 9 sums to 0"),
        (lambda p: p + 0.01, r"row 0 sums to"),
        (lambda p: torch.randn(N, K_OUT, dtype=DT), r"targets"),
    ],
    ids=["doubled", "negative", "zero-row", "offset", "logits"],
)
def test_problem_soft_targets_must_be_probabilities(edit, pattern):
    X, _ = class_data()
    torch.manual_seed(0)
    with pytest.raises(InvalidArgumentError, match=r"targets.*" + pattern.split("targets")[-1]):
        gs.Problem(make_mlp(), "cross_entropy", (X, edit(_soft())))


def test_problem_soft_targets_accepted_and_match_torch():
    X, _ = class_data()
    P = _soft()
    prob = gs.Problem(make_mlp(), "cross_entropy", (X, P))
    ref = nn.functional.cross_entropy(prob.model(X), P)
    assert torch.allclose(prob.loss(), ref)
    # float32 probabilities are cast with the problem's dtype
    prob32 = gs.Problem(make_mlp(), "cross_entropy", (X, P.float()))
    assert torch.allclose(prob32.loss(), ref, atol=1e-6)


def test_problem_valid_labels_still_work():
    X, y = class_data()
    y = y.clone()
    y[0], y[-1] = 0, K_OUT - 1
    prob = gs.Problem(make_mlp(), "cross_entropy", (X, y))
    assert torch.isfinite(prob.loss())


# ====================================================================== batch structure
class _Triples(torch.utils.data.Dataset):
    def __init__(self, n_items: int) -> None:
        self.X, self.Y = regression_data()
        self.n_items = n_items

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        item = (self.X[i], self.Y[i], torch.tensor(1.0, dtype=DT), torch.tensor(2.0))
        return item[: self.n_items]


class _Dicts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        X, Y = regression_data()
        return {"x": X[i], "y": Y[i]}


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (DataLoader(_Triples(3), batch_size=5), r"3 elements.*weights.*not supported"),
        (DataLoader(_Triples(4), batch_size=5), r"4 elements.*Wrap the dataset"),
        (DataLoader(_Triples(1), batch_size=5), r"1 elements"),
        (DataLoader(_Dicts(), batch_size=5), r"dict with keys \['x', 'y'\]"),
        ([(regression_data()[0], regression_data()[1], torch.ones(N))], r"3 elements"),
        ((*regression_data(), torch.ones(N)), r"3 arrays.*weights"),
        ([torch.ones(N, 4)], r"1 arrays"),
    ],
    ids=["xyw", "xywz", "x-only", "dict", "list-of-triples", "XYW-tuple", "list-of-one"],
)
def test_problem_batches_must_be_pairs(data, pattern):
    with pytest.raises(InvalidArgumentError, match=r"data.*" + pattern):
        gs.Problem(make_mlp(), "mse", data)


def test_problem_later_triple_batch_refused():
    """Only the third batch carries weights: refused when it is reached, never dropped."""
    X, Y = regression_data()
    batches = [(X[:8], Y[:8]), (X[8:16], Y[8:16]), (X[16:], Y[16:], torch.ones(4))]
    prob = gs.Problem(make_mlp(), "mse", batches)
    with pytest.raises(InvalidArgumentError, match=r"batch 2 from data.*3 elements"):
        prob.loss()


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"device": "cuda"}, InvalidArgumentError, r"device='cuda'.*is_available\(\) is False"),
        ({"device": "cuda:1"}, InvalidArgumentError, r"device='cuda:1'"),
        ({"device": torch.device("cuda")}, InvalidArgumentError, r"device=device\(type='cuda'"),
        ({"device": "gpu"}, InvalidArgumentError, r"device='gpu'.*not a device name"),
        ({"device": 3.5}, InvalidArgumentError, r"device=3\.5"),
        ({"device": True}, InvalidArgumentError, r"device=True"),
        ({"dtype": "float64"}, InvalidArgumentError, r"dtype='float64'.*torch\.float64"),
        ({"dtype": torch.int64}, InvalidArgumentError, r"dtype=torch\.int64"),
        ({"dtype": torch.complex128}, InvalidArgumentError, r"dtype=torch\.complex128"),
        ({"dtype": np.float64}, InvalidArgumentError, r"dtype="),
        ({"reduction": "none"}, InvalidArgumentError, r"reduction='none'"),
        ({"reduction": ["mean"]}, InvalidArgumentError, r"reduction=\['mean'\]"),
        ({"allow_stateful": "yes"}, InvalidArgumentError, r"allow_stateful='yes'"),
    ],
)
def test_problem_bad_keyword_arguments(kwargs, exc, pattern):
    if "cuda" in str(kwargs.get("device", "")) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    X, Y = regression_data()
    with pytest.raises(exc, match=pattern):
        gs.Problem(make_mlp(), "mse", (X, Y), **kwargs)


@pytest.mark.parametrize(
    ("model", "loss", "data", "exc", "pattern"),
    [
        (lambda x: x, "mse", None, InvalidArgumentError, r"model must be a torch\.nn\.Module"),
        ("mlp", "mse", None, InvalidArgumentError, r"model must be a torch\.nn\.Module, got str"),
        (None, "hinge", None, InvalidArgumentError, r"loss='hinge'"),
        (None, "MSE", None, InvalidArgumentError, r"loss='MSE'"),
        (None, 3, None, InvalidArgumentError, r"loss must be"),
        (None, "mse", "numpy", InvalidArgumentError, r"data=\(X, Y\) must hold torch tensors"),
        (None, "mse", "one-tensor", InvalidArgumentError, r"data must be an \(X, Y\) pair"),
        (None, "mse", "one-array", InvalidArgumentError, r"data must be an \(X, Y\) pair"),
        (None, "mse", "dict", InvalidArgumentError, r"data must be .* got dict"),
        (None, "mse", "str", InvalidArgumentError, r"data must be .* got str"),
        (None, "mse", 42, InvalidArgumentError, r"data must be .* got int"),
        (None, "mse", "scalar-X", ShapeMismatchError, r"X \(data\[0\]\) is a scalar"),
        (None, "mse", "complex", InvalidArgumentError, r"\bx\b.*complex"),
        (None, "mse", "loader-of-lists", InvalidArgumentError, r"\bx\b.*not a torch\.Tensor"),
    ],
)
def test_problem_argument_types(model, loss, data, exc, pattern):
    X, Y = regression_data()
    model = make_mlp() if model is None else (model if model != "mlp" else "mlp")
    datas = {
        None: (X, Y),
        "numpy": (X.numpy(), Y.numpy()),
        "one-tensor": X,
        "one-array": X.numpy(),
        "dict": {"x": X, "y": Y},
        "str": "data.csv",
        "scalar-X": (torch.tensor(1.0, dtype=DT), Y),
        "complex": (X.to(torch.complex128), Y),
        "loader-of-lists": [([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0])],
    }
    with pytest.raises(exc, match=pattern):
        gs.Problem(model, loss, datas.get(data, data) if not isinstance(data, int) else data)


# ====================================================================== ntk / ntk_eigs / disparity
def _x(n: int = 6, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=DT)


KERNEL_FNS = {
    "ntk": lambda m, x: gs.ntk(m, x),
    "ntk_trace": lambda m, x: gs.ntk(m, x, trace_outputs=True, method="vp"),
    "ntk_eigs": lambda m, x: gs.ntk_eigs(m, x),
    "ntk_eigs_lanczos": lambda m, x: gs.ntk_eigs(m, x, dense_limit=0),
    "disparity": lambda m, x: gs.disparity(m, x),
    "disparity_eigs": lambda m, x: gs.disparity(m, x, memory=8),
}


@pytest.mark.parametrize("fn", list(KERNEL_FNS))
@pytest.mark.parametrize(
    ("index", "value", "pattern"),
    [((0, 0), NAN, r"\bx\b.*NaN at sample 0"), ((4, 3), INF, r"\bx\b.*\+inf at sample 4")],
)
def test_kernels_nonfinite_x(fn, index, value, pattern):
    with pytest.raises(NonFiniteError, match=pattern):
        KERNEL_FNS[fn](make_mlp(), _poison(_x(), index, value))


@pytest.mark.parametrize("fn", list(KERNEL_FNS))
def test_kernels_nonfinite_parameters(fn):
    model = make_mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = NAN
    with pytest.raises(NonFiniteError, match=r"parameter '2\.weight'.*NaN at index \(1, 1\)"):
        KERNEL_FNS[fn](model, _x())


def test_ntk_eigs_nan_used_to_give_finite_lambda_min():
    """The reported bug: one NaN in x gave a finite λ_min with no flag."""
    with pytest.raises(NonFiniteError, match=r"\bx\b.*sample 2"):
        gs.ntk_eigs(make_mlp(), _poison(_x(), (2, 1), NAN), k=1, which="smallest")


@pytest.mark.parametrize(
    ("x2", "pattern"),
    [
        (_poison(_x(3), (1, 0), NAN), r"\bx2\b.*NaN at sample 1"),
        (_poison(_x(3), (2, 3), -INF), r"x2.*-inf at sample 2"),
    ],
)
def test_ntk_nonfinite_x2(x2, pattern):
    with pytest.raises(NonFiniteError, match=pattern):
        gs.ntk(make_mlp(), _x(), x2)


def test_ntk_overflow_in_cast_named():
    """Finite float64 inputs that overflow when cast to a float32 model."""
    model = make_mlp().float()
    x = _x()
    x[1, 0] = 1e300
    with pytest.raises(NonFiniteError, match=r"x \(cast to the model's torch\.float32\).*sample 1"):
        gs.ntk(model, x)
    with pytest.raises(NonFiniteError, match=r"x \(cast to the model's torch\.float32\)"):
        gs.ntk_eigs(model, x)


def test_function_space_disparity_nonfinite_parameters():
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    with torch.no_grad():
        model[0].bias[0] = INF
    with pytest.raises(NonFiniteError, match=r"parameter '0\.bias'"):
        function_space_disparity(model, ((-1.0, 1.0),), 2)


NTK_BAD = [
    ({"x": _x(6, 5)}, ShapeMismatchError, r"per-sample shape \(5,\)"),
    ({"x": _x(6, 3)}, ShapeMismatchError, r"per-sample shape \(3,\)"),
    ({"x2": _x(4, 5)}, ShapeMismatchError, r"x2 has per-sample shape"),
    ({"x2": _x(4, 4)[:0]}, InvalidArgumentError, r"x2 is empty"),
    ({"x": _x()[:0]}, InvalidArgumentError, r"\bx is empty"),
    ({"x": torch.tensor(1.0, dtype=DT)}, ShapeMismatchError, r"\bx is a scalar"),
    ({"x": _x().numpy()}, InvalidArgumentError, r"x must be a torch\.Tensor"),
    ({"x2": [[1.0] * 4]}, InvalidArgumentError, r"x2 must be a torch\.Tensor"),
    ({"x": _x().to(torch.complex128)}, InvalidArgumentError, r"\bx is complex"),
    ({"method": "fast"}, InvalidArgumentError, r"method='fast'"),
    ({"method": "JACOBIAN "}, InvalidArgumentError, r"method='JACOBIAN '"),
    ({"method": 1}, InvalidArgumentError, r"method=1"),
    ({"memory": 0}, InvalidArgumentError, r"memory must be a positive"),
    ({"memory": -5}, InvalidArgumentError, r"memory must be a positive"),
    ({"memory": math.nan}, InvalidArgumentError, r"memory must be a positive"),
    ({"memory": math.inf}, InvalidArgumentError, r"memory must be a positive"),
    ({"memory": "1GB"}, InvalidArgumentError, r"memory must be a positive"),
    ({"memory": True}, InvalidArgumentError, r"memory must be a positive"),
    ({"trace_outputs": "yes"}, InvalidArgumentError, r"trace_outputs"),
    ({"trace_outputs": 1}, InvalidArgumentError, r"trace_outputs"),
]


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), NTK_BAD)
def test_ntk_bad_arguments(kwargs, exc, pattern):
    kw = dict(kwargs)
    x = kw.pop("x", _x())
    with pytest.raises(exc, match=pattern):
        gs.ntk(make_mlp(), x, **kw)


@pytest.mark.parametrize(
    "block_size", [0, -1, True, 2.5, "4"], ids=["zero", "neg", "bool", "float", "str"]
)
def test_ntk_blocks_bad_block_size(block_size):
    with pytest.raises(InvalidArgumentError, match=r"block_size"):
        gs.ntk_blocks(make_mlp(), _x(), block_size=block_size)


@pytest.mark.parametrize("model", [lambda x: x, "mlp", None, nn.Linear], ids=str)
def test_kernels_model_not_a_module(model):
    for call in (gs.ntk, gs.ntk_eigs, gs.disparity):
        with pytest.raises(InvalidArgumentError, match=r"model must be a torch\.nn\.Module"):
            call(model, _x())


EIGS_BAD = [
    ({"k": 0}, r"\bk=0\b"),
    ({"k": -2}, r"\bk=-2\b"),
    ({"k": 1.0}, r"\bk=1\.0\b"),
    ({"k": "a"}, r"\bk='a' \(str\)"),
    ({"k": True}, r"\bk=True\b"),
    ({"k": 19}, r"\bk=19 asks for 19"),  # 6 samples × 3 outputs = 18
    ({"k": 10, "which": "both"}, r"\bk=10 asks for 20"),
    ({"k": 7, "trace_outputs": True}, r"\bk=7 asks for 7 .* 6×6"),
    ({"which": "min"}, r"which='min'"),
    ({"which": "LARGEST"}, r"which='LARGEST'"),
    ({"which": None}, r"which=None"),
    ({"which": ["smallest"]}, r"which=\['smallest'\]"),
    ({"tol": 0}, r"tol=0\b"),
    ({"tol": -1e-6}, r"tol=-1e-06"),
    ({"tol": 1.5}, r"tol=1\.5"),
    ({"tol": math.inf}, r"tol=inf"),
    ({"tol": "1e-8"}, r"tol='1e-8'"),
    ({"tol": True}, r"tol=True"),
    ({"dense_limit": -1}, r"dense_limit=-1"),
    ({"dense_limit": 2.5}, r"dense_limit=2\.5"),
    ({"max_matvecs": 0}, r"max_matvecs=0"),
    ({"max_matvecs": -3}, r"max_matvecs=-3"),
    ({"max_matvecs": 2.0}, r"max_matvecs=2\.0"),
    ({"trace_outputs": "no"}, r"trace_outputs"),
]


@pytest.mark.parametrize(("kwargs", "pattern"), EIGS_BAD)
def test_ntk_eigs_bad_arguments(kwargs, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        gs.ntk_eigs(make_mlp(), _x(), **kwargs)


@pytest.mark.parametrize(
    ("x", "exc", "pattern"),
    [
        (_x(6, 5), ShapeMismatchError, r"per-sample shape \(5,\)"),
        (_x(6, 2), ShapeMismatchError, r"per-sample shape \(2,\)"),
        (_x()[:0], InvalidArgumentError, r"\bx is empty"),
        (torch.tensor(2.0, dtype=DT), ShapeMismatchError, r"\bx is a scalar"),
        ([[0.0] * 4], InvalidArgumentError, r"x must be a torch\.Tensor"),
        (_x().to(torch.complex128), InvalidArgumentError, r"\bx is complex"),
    ],
)
@pytest.mark.parametrize("call", ["ntk_eigs", "disparity"])
def test_eigs_and_disparity_bad_x(call, x, exc, pattern):
    fn = gs.ntk_eigs if call == "ntk_eigs" else gs.disparity
    with pytest.raises(exc, match=pattern):
        fn(make_mlp(), x)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"tol": -1e-3}, r"tol=-0\.001"),
        ({"tol": -math.inf}, r"tol=-inf"),
        ({"tol": math.nan}, r"tol=nan"),
        ({"tol": "0"}, r"tol='0'"),
        ({"tol": True}, r"tol=True"),
        ({"memory": 0}, r"memory=0"),
        ({"memory": -1}, r"memory=-1"),
        ({"memory": 1.5e9}, r"memory=1500000000\.0"),
        ({"memory": "1GB"}, r"memory='1GB'"),
    ],
)
def test_disparity_bad_arguments(kwargs, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        gs.disparity(make_mlp(), _x(), **kwargs)


# ====================================================================== Problem.subset
@pytest.mark.parametrize(
    ("indices", "exc", "pattern"),
    [
        ([], InvalidArgumentError, r"subset indices must be a non-empty"),
        ([N], InvalidArgumentError, r"subset indices .* \[0, 20\), got \[20\]"),
        ([-1], InvalidArgumentError, r"subset indices .* got \[-1\]"),
        ([[0, 1]], InvalidArgumentError, r"subset indices .* 1-D"),
        ([0.5, 1.0], InvalidArgumentError, r"subset indices have dtype torch\.float32"),
        (torch.tensor([0.0]), InvalidArgumentError, r"subset indices have dtype"),
        (torch.tensor([True, False]), ShapeMismatchError, r"subset indices is a boolean mask"),
        ("ab", InvalidArgumentError, r"subset indices must be .* got str"),
    ],
)
def test_problem_subset_bad_indices(indices, exc, pattern):
    prob = gs.Problem(make_mlp(), "mse", regression_data())
    with pytest.raises(exc, match=pattern):
        prob.subset(indices)


def test_problem_subset_boolean_mask_selects_samples():
    """A mask used to be cast to 0/1 indices (samples 0 and 1): now it selects its samples."""
    X, Y = regression_data()
    prob = gs.Problem(make_mlp(), "mse", (X, Y))
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[3, 7, 11]] = True
    sub = prob.subset(mask)
    assert torch.equal(sub.full_batch[0], X[[3, 7, 11]])


# ====================================================================== zoo arguments
@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: gs.zoo.load_dataset("sphere", n=3, d=3, seed="a"), r"seed='a'"),
        (lambda: gs.zoo.load_dataset("sphere", n=3, d=3, seed=1.5), r"seed=1\.5"),
        (lambda: gs.zoo.load_dataset("sphere", n=3, d=3, seed=True), r"seed=True"),
        (lambda: gs.zoo.load_dataset("sphere", n=3, d=3, seed=2**70), r"seed=\d+"),
        (lambda: gs.zoo.load_dataset("sphere", n=3, d=3, one_hot="no"), r"one_hot='no'"),
        (lambda: gs.zoo.load_dataset("digits", n=3, train="yes"), r"train='yes'"),
        (lambda: gs.zoo.load_dataset(3), r"name=3"),
        (lambda: gs.zoo.load_dataset("cifar10", root=3), r"root=3 must be a path"),
        (lambda: gs.zoo.mnist(["/tmp"]), r"root=\['/tmp'\] must be a path"),
        (lambda: gs.zoo.digits(n=3, one_hot=None), r"one_hot=None"),
        (lambda: gs.zoo.digits(n=3, standardize="z"), r"standardize='z'"),
        (lambda: gs.zoo.mnist1d(n=3, channels="yes"), r"channels='yes'"),
        (lambda: gs.zoo.mnist1d(n=3, data_seed="42"), r"data_seed='42'"),
        (lambda: gs.zoo.sphere(3, 3, target="labels", k=3, one_hot="x"), r"one_hot='x'"),
        (lambda: gs.zoo.sphere(3, 3, target=None), r"target=None"),
        (lambda: gs.zoo.sphere(3, 3, seed=None), r"seed=None"),
        (lambda: gs.zoo.mlp(5), r"sizes=5"),
        (lambda: gs.zoo.mlp([4, None, 3]), r"sizes=\[4, None, 3\]"),
        (lambda: gs.zoo.mlp([4, 3], seed="s"), r"seed='s'"),
        (lambda: gs.zoo.mlp([4, 3], bias="no"), r"bias='no'"),
        (lambda: gs.zoo.cnn(1, 3, seed=0.5), r"seed=0\.5"),
        (lambda: gs.zoo.cnn(1, 3, dims=True), r"dims=True"),
        (lambda: gs.zoo.cnn(1, 3, channels=None), r"channels=None"),
        (lambda: gs.zoo.preact_resnet(1, 3, seed="0"), r"seed='0'"),
        (lambda: gs.zoo.preact_resnet(1, 3, depth=None), r"depth=None"),
        (lambda: gs.zoo.preact_resnet(1, 3, dims=True), r"dims=True"),
        (lambda: gs.zoo.as_dataset([[1.0], [NAN]], [0.0, 1.0]), r"\bX contains NaN.*sample 1"),
        (lambda: gs.zoo.as_dataset([[1.0], [2.0]], [0.0, INF]), r"\bY contains NaN.*sample 1"),
    ],
)
def test_zoo_bad_arguments(call, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        call()


def test_zoo_numpy_integer_seed_accepted():
    X1, _ = gs.zoo.sphere(4, 3, seed=np.int64(5))
    X2, _ = gs.zoo.sphere(4, 3, seed=5)
    assert torch.equal(X1, X2)


@pytest.mark.parametrize(("index", "label"), [(4, K_OUT), (0, -1), (17, 50)])
def test_problem_cross_entropy_module_labels_checked(index, label):
    X, y = class_data()
    y = y.clone()
    y[index] = label
    with pytest.raises(InvalidArgumentError, match=rf"targets.*class label {label} at sample"):
        gs.Problem(make_mlp(), nn.CrossEntropyLoss(), (X, y))


def test_problem_cross_entropy_module_ignore_index_allowed():
    """nn.CrossEntropyLoss(ignore_index=...) labels are the user's explicit choice."""
    X, y = class_data()
    y = y.clone()
    y[2] = -7
    prob = gs.Problem(make_mlp(), nn.CrossEntropyLoss(ignore_index=-7), (X, y))
    assert torch.isfinite(prob.loss())


@pytest.mark.parametrize(
    "make",
    [
        lambda X, Y: ((X[i : i + 5], Y[i : i + 5]) for i in range(0, N, 5)),
        lambda X, Y: iter([(X, Y)]),
        lambda X, Y: zip(X.split(5), Y.split(5), strict=True),
        lambda X, Y: iter(DataLoader(TensorDataset(X, Y), batch_size=5)),
    ],
    ids=["generator", "list-iterator", "zip", "loader-iterator"],
)
def test_problem_one_shot_iterator_refused(make):
    """A generator used to lose its first batch to the validation pass."""
    X, Y = regression_data()
    with pytest.raises(InvalidArgumentError, match=r"data is a one-shot iterator"):
        gs.Problem(make_mlp(), "mse", make(X, Y))


def test_problem_drop_last_warns_about_dropped_samples():
    X, Y = regression_data()
    with pytest.warns(UserWarning, match=r"drop_last=True: 2 sample"):
        prob = gs.Problem(make_mlp(), "mse", DataLoader(TensorDataset(X, Y), 6, drop_last=True))
    assert prob.n == 18


@pytest.mark.parametrize("where", ["x", "param"])
def test_ntk_operator_refuses_nonfinite(where):
    from gdscope.errors import NonFiniteError
    from gdscope.kernels.operator import ntk_operator

    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    if where == "x":
        x[2, 1] = float("nan")
    else:
        with torch.no_grad():
            model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="x" if where == "x" else "weight"):
        ntk_operator(model, x)
