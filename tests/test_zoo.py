"""The model zoo and data sets: NTK parameterization against the infinite-width limit, ResNet
shortcut variants (shared initialization, unit singular values, exact identities), and the file
readers on tiny files written in the standard formats."""

from __future__ import annotations

import gzip
import itertools
import math
import pickle
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.zoo import (
    ACTIVATIONS,
    DATASETS,
    NORMS,
    SHORTCUTS,
    IdentityShortcut,
    ModifiedShortcut,
    NTKLinear,
    PooledShortcut,
    as_dataset,
    cifar10,
    cifar100,
    cnn,
    digits,
    load_dataset,
    mlp,
    mnist,
    mnist1d,
    preact_resnet,
    sphere,
)

DT = torch.float64


def _unit_sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return x / x.norm(dim=1, keepdim=True)


# ============================================================================== models
def test_mlp_default_init_is_pytorchs_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    net = mlp([4, 7, 3], "tanh", seed=5, dtype=DT)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    for (na, a), (nb, b) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        assert na == nb and torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_builds(name):
    net = mlp([3, 5, 2], name, seed=0, dtype=DT)
    assert net(torch.randn(4, 3, dtype=DT)).shape == (4, 2)
    assert isinstance(net[1], ACTIVATIONS[name])


def test_erf_and_leaky_relu_modules():
    z = torch.linspace(-3, 3, 13, dtype=DT)
    assert torch.equal(ACTIVATIONS["erf"]()(z), torch.erf(z))
    assert torch.allclose(ACTIVATIONS["leaky_relu"]()(z), torch.where(z > 0, z, 0.01 * z))


def test_standard_parameterization_with_variances():
    net = mlp([400, 300, 2], "relu", seed=0, weight_var=2.0, bias_var=0.25, dtype=DT)
    w, b = net[0].weight.detach(), net[0].bias.detach()
    assert abs(float(w.std()) / math.sqrt(2.0 / 400) - 1) < 0.02  # 120k draws
    assert abs(float(b.std()) / 0.5 - 1) < 0.15  # 300 draws
    assert abs(float(w.mean())) < 3 * math.sqrt(2.0 / 400) / math.sqrt(w.numel())


def test_ntk_linear_forward_formula():
    torch.manual_seed(0)
    lay = NTKLinear(6, 3, weight_var=1.7, bias_var=0.3, dtype=DT)
    assert lay.weight.dtype == DT and lay.weight.shape == (3, 6)
    x = torch.randn(5, 6, dtype=DT)
    ref = math.sqrt(1.7 / 6) * x @ lay.weight.T + math.sqrt(0.3) * lay.bias
    assert torch.allclose(lay(x), ref, rtol=1e-14, atol=0)
    nob = NTKLinear(6, 3, bias=False, weight_var=1.7, dtype=DT)
    assert nob.bias is None and [n for n, _ in nob.named_parameters()] == ["weight"]


def test_ntk_parameterization_same_net_in_every_dtype():
    a = mlp([3, 8, 2], "relu", parameterization="ntk", seed=3, dtype=torch.float32)
    b = mlp([3, 8, 2], "relu", parameterization="ntk", seed=3, dtype=DT)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert pb.dtype == DT and torch.equal(pa.to(DT), pb)
    # N(0, 1) entries, whatever the variances
    big = mlp([500, 400, 1], "relu", parameterization="ntk", weight_var=9.0, seed=0)
    assert abs(float(big[0].weight.detach().std()) - 1) < 0.01


@pytest.mark.parametrize(
    "activation, depth, weight_var, bias_var, final_tol",
    [("relu", 2, 2.0, 0.0, 0.15), ("erf", 1, 1.5, 0.2, 0.05)],
)
def test_wide_ntk_mlp_converges_to_infinite_ntk(activation, depth, weight_var, bias_var, final_tol):
    """Relative Frobenius error of the empirical NTK (mean over 3 nets) shrinks with width."""
    x = _unit_sphere(8, 5)
    K = gs.infinite_ntk(
        x, depth=depth, activation=activation, weight_var=weight_var, bias_var=bias_var
    )
    errs = []
    for width in (64, 256, 1024):
        e = []
        for seed in range(3):
            net = mlp(
                [5] + [width] * depth + [1],
                activation,
                parameterization="ntk",
                weight_var=weight_var,
                bias_var=bias_var,
                seed=seed,
                dtype=DT,
            )
            Ke = gs.ntk(net, x, trace_outputs=True)
            e.append(float((Ke - K).norm() / K.norm()))
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < errs[0] / 2.5, errs  # 1/sqrt(width) predicts a factor 4
    assert errs[2] < final_tol, errs


def test_ntk_auto_on_ntk_linear_matches_jacobian():
    net = mlp([4, 16, 16, 3], "tanh", parameterization="ntk", bias_var=0.1, seed=0, dtype=DT)
    x = torch.randn(6, 4, dtype=DT)
    auto = gs.ntk(net, x, method="auto")
    jac = gs.ntk(net, x, method="jacobian")
    assert auto.shape == (6, 6, 3, 3)
    assert torch.allclose(auto, jac, rtol=1e-12, atol=1e-12)


def test_mlp_argument_errors():
    with pytest.raises(InvalidArgumentError, match="sizes"):
        mlp([4])
    with pytest.raises(InvalidArgumentError, match="sizes"):
        mlp([4, 0, 2])
    with pytest.raises(InvalidArgumentError, match="activation='swish'"):
        mlp([4, 2], "swish")
    with pytest.raises(InvalidArgumentError, match="parameterization='mup'"):
        mlp([4, 2], parameterization="mup")
    with pytest.raises(InvalidArgumentError, match="weight_var=-1"):
        mlp([4, 2], parameterization="ntk", weight_var=-1.0)
    with pytest.raises(InvalidArgumentError, match="bias=False"):
        mlp([4, 2], bias=False, bias_var=0.5)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        mlp([4, 2], dtype=torch.int64)


@pytest.mark.parametrize("dims, shape", [(1, (3, 2, 41)), (2, (3, 2, 9, 12))])
def test_cnn_shapes_and_layers(dims, shape):
    net = cnn(2, 7, dims=dims, channels=(4, 6, 8), seed=0, dtype=DT)
    out = net(torch.randn(*shape, dtype=DT))
    assert out.shape == (3, 7)
    convs = [m for m in net if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert [c.out_channels for c in convs] == [4, 6, 8]
    assert all(c.stride[0] == 2 for c in convs)
    assert isinstance(net[-1], nn.Linear) and net[-1].in_features == 8
    with pytest.raises(InvalidArgumentError, match="dims=3"):
        cnn(2, 7, dims=3)
    with pytest.raises(InvalidArgumentError, match="channels"):
        cnn(2, 7, channels=())


# ============================================================================== ResNet
def _input(dims: int, n: int = 2, c: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n, c, size) if dims == 1 else (n, c, size, size)
    return torch.randn(*shape, generator=g, dtype=DT)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("norm", NORMS)
def test_resnet_shapes(dims, shortcut, norm):
    net = preact_resnet(
        3, 5, dims=dims, width=4, depth=(1, 2, 1), shortcut=shortcut, norm=norm, seed=0, dtype=DT
    )
    x = _input(dims, size=12)
    assert net(x).shape == (2, 5)
    assert len(net.blocks) == 4
    sizes = [(4, 12), (8, 6), (8, 6), (16, 3)]  # stages double channels, halve the size
    for i, (c, s) in enumerate(sizes):
        h = net.block_output(x, i)
        assert h.shape == (2, c) + (s,) * dims
    assert [b.shortcut is None for b in net.blocks] == [shortcut == "none"] * 4


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in net.named_parameters()}


@pytest.mark.parametrize("norm", NORMS)
def test_shortcut_variants_share_identical_initial_weights(norm):
    nets = {
        s: preact_resnet(3, 5, dims=2, width=4, depth=(2, 1, 1), shortcut=s, norm=norm, seed=7)
        for s in SHORTCUTS
    }
    base = _params(nets["none"])
    for s, net in nets.items():
        p = _params(net)
        assert set(base) <= set(p)
        for name, value in base.items():
            assert torch.equal(p[name], value), (s, name)
    # the projections of "projection" and "modified" are the same draws too
    proj, mod = _params(nets["projection"]), _params(nets["modified"])
    extra = sorted(set(proj) - set(base))
    assert len(extra) == 2 * (2 if norm == "weight" else 1)  # two transition blocks
    for name in extra:
        assert torch.equal(proj[name], mod[name.replace("shortcut.", "shortcut.projection.")])
    # and the variants are different functions
    x = torch.randn(2, 3, 8, 8)
    outs = {s: net.eval()(x) for s, net in nets.items()}
    for a, b in itertools.combinations(SHORTCUTS, 2):
        assert not torch.allclose(outs[a], outs[b]), (a, b)


def _linear_map(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Matrix of a linear map on ``in_shape`` inputs (rows: outputs), from basis vectors."""
    m = math.prod(in_shape)
    basis = torch.eye(m, dtype=DT).reshape(m, *in_shape)
    return fn(basis).reshape(m, -1).T


@pytest.mark.parametrize("dims, size", [(1, 10), (2, 6)])
def test_modified_shortcut_pooled_path_has_unit_singular_values(dims, size):
    cin, cout, s = 3, 6, 2
    pooled = PooledShortcut(cin, cout, s, dims)
    assert pooled.scale == pytest.approx(s ** (dims / 2))
    A = _linear_map(pooled, (cin,) + (size,) * dims)
    out_sp = (size // s) ** dims
    A = A.reshape(cout, out_sp, -1)
    assert torch.equal(A[cin:], torch.zeros_like(A[cin:]))  # the zero-padded channels
    sv = torch.linalg.svdvals(A[:cin].reshape(cin * out_sp, -1))
    assert sv.shape == (cin * out_sp,)
    assert torch.allclose(sv, torch.ones_like(sv), rtol=0, atol=1e-12)
    # without the s^{D/2} factor they would be s^{-D/2}
    raw = _linear_map(
        lambda x: F.avg_pool1d(x, s) if dims == 1 else F.avg_pool2d(x, s), (1,) + (size,) * dims
    )
    assert torch.allclose(
        torch.linalg.svdvals(raw), torch.full((out_sp,), s ** (-dims / 2), dtype=DT)
    )


@pytest.mark.parametrize("dims", [1, 2])
def test_modified_shortcut_is_pooled_plus_projection(dims):
    net = preact_resnet(
        3, 5, dims=dims, width=4, depth=(1, 1), shortcut="modified", norm="none", seed=0, dtype=DT
    )
    block = net.blocks[1]
    sc = block.shortcut
    assert isinstance(sc, ModifiedShortcut) and isinstance(sc.pooled, PooledShortcut)
    h = net.block_output(_input(dims, c=3, size=8), 0)
    conv = F.conv1d if dims == 1 else F.conv2d
    pool = F.avg_pool1d if dims == 1 else F.avg_pool2d
    pooled = 2 ** (dims / 2) * pool(h, 2)
    pooled = torch.cat([pooled, torch.zeros_like(pooled)], dim=1)  # 4 -> 8 channels
    ref = pooled + conv(h, sc.projection.weight, stride=2)
    assert torch.allclose(sc(h), ref, rtol=1e-13, atol=1e-13)
    assert torch.allclose(block(h), block.residual(h) + ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dims", [1, 2])
def test_identity_shortcut_exact(dims):
    net = preact_resnet(
        3, 5, dims=dims, width=4, depth=(2, 1), shortcut="identity", seed=0, dtype=DT
    )
    x = _input(dims, c=3, size=7)
    h = net.stem(x)
    same = net.blocks[0]
    assert not same.transition
    assert torch.equal(same(h), same.residual(h) + h)
    assert torch.equal(same.shortcut(h), h)
    # transition: strided subsampling (odd size 7 -> 4) and zero channels
    h = net.block_output(x, 1)
    trans = net.blocks[2]
    assert isinstance(trans.shortcut, IdentityShortcut)
    sub = h[:, :, ::2] if dims == 1 else h[:, :, ::2, ::2]
    ref = torch.cat([sub, torch.zeros_like(sub)], dim=1)
    assert torch.equal(trans.shortcut(h), ref)
    assert trans(h).shape == ref.shape


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_resnet_split_at_blocks_and_block_jacobian(shortcut):
    net = preact_resnet(1, 4, dims=1, width=3, depth=(1, 1, 1), shortcut=shortcut, seed=0, dtype=DT)
    net.eval()
    x = _input(1, n=3, c=1, size=16)
    full = net(x)
    for i in range(len(net.blocks)):
        assert torch.allclose(net.from_block_output(net.block_output(x, i), i), full, atol=1e-14)
    h = net.block_output(x[:1], 1)
    J = torch.func.jacrev(lambda hh: net.from_block_output(hh, 1))(h)
    assert J.shape == (1, 4, *h.shape)
    assert torch.equal(net.block_output(x, -1), net.block_output(x, 2))
    with pytest.raises(InvalidArgumentError, match="i=3"):
        net.block_output(x, 3)


@pytest.mark.parametrize("dims", [1, 2])
def test_weight_norm_starts_as_the_same_function(dims):
    kw = dict(dims=dims, width=4, depth=(1, 1), shortcut="modified", seed=3, dtype=DT)
    wn, plain = preact_resnet(2, 3, norm="weight", **kw), preact_resnet(2, 3, norm="none", **kw)
    assert any("parametrizations" in n for n, _ in wn.named_parameters())
    x = _input(dims, c=2, size=8)
    assert torch.allclose(wn(x), plain(x), rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # weight norm
@pytest.mark.parametrize("norm", NORMS)
def test_resnet_ntk_auto_matches_jacobian(norm):
    net = preact_resnet(
        1, 2, dims=1, width=2, depth=(1, 1), shortcut="modified", norm=norm, seed=0, dtype=DT
    )
    net.eval()
    x = _input(1, n=3, c=1, size=8)
    auto = gs.ntk(net, x, method="auto")
    jac = gs.ntk(net, x, method="jacobian")
    assert torch.allclose(auto, jac, rtol=1e-10, atol=1e-12)


def test_resnet_argument_errors():
    with pytest.raises(InvalidArgumentError, match="shortcut='skip'"):
        preact_resnet(1, 2, shortcut="skip")
    with pytest.raises(InvalidArgumentError, match="norm='layer'"):
        preact_resnet(1, 2, norm="layer")
    with pytest.raises(InvalidArgumentError, match="depth"):
        preact_resnet(1, 2, depth=())
    with pytest.raises(InvalidArgumentError, match="dims=3"):
        preact_resnet(1, 2, dims=3)
    with pytest.raises(InvalidArgumentError, match="width=0"):
        preact_resnet(1, 2, width=0)


# ============================================================================== data
def test_digits_conventions():
    X, Y = digits(50, seed=1, dtype=DT)
    Xi, y = digits(50, seed=1, one_hot=False)
    assert X.shape == (50, 64) and Y.shape == (50, 10) and X.dtype == DT
    assert y.dtype == torch.long and torch.equal(Y.argmax(1), y)
    assert torch.allclose(X.to(torch.float32), Xi)
    with pytest.raises(InvalidArgumentError, match="n=0"):
        digits(0)


def test_mnist1d_generated_offline_cached_and_rng_safe():
    random.seed(11)
    np.random.seed(11)
    py_state, np_state = random.getstate(), np.random.get_state()
    X, Y = mnist1d(dtype=DT)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert X.shape == (4000, 40) and Y.shape == (4000, 10) and X.dtype == DT
    counts = Y.sum(0)
    assert int(counts.sum()) == 4000 and int(counts.min()) > 300  # ~400 per class
    Xt, yt = mnist1d(train=False, one_hot=False, channels=True)
    assert Xt.shape == (1000, 1, 40) and yt.shape == (1000,) and int(yt.max()) == 9
    # the generator standardizes over all 5000 signals
    both = torch.cat([X, Xt[:, 0].to(DT)])
    assert abs(float(both.mean())) < 1e-6 and abs(float(both.std()) - 1) < 1e-3
    # subsampling is a deterministic draw of rows of the full split; Y follows X
    Xs, ys = mnist1d(10, seed=4, one_hot=False, dtype=DT)
    rows = [int(((X - r).abs().sum(1) == 0).nonzero()[0]) for r in Xs]
    assert torch.equal(Y[rows].argmax(1), ys)
    assert torch.equal(mnist1d(10, seed=4, dtype=DT)[0], Xs)


def test_sphere_targets():
    X, Y = sphere(50, 6, k=2, seed=3, dtype=DT)
    assert X.shape == (50, 6) and Y.shape == (50, 2)
    assert torch.allclose(X.norm(dim=1), torch.ones(50, dtype=DT), atol=1e-14)
    assert torch.equal(sphere(50, 6, k=2, seed=3, dtype=DT)[1], Y)
    assert not torch.equal(sphere(50, 6, k=2, seed=4, dtype=DT)[1], Y)
    _, yl = sphere(40, 3, k=4, target="labels", one_hot=False)
    assert yl.dtype == torch.long and set(yl.tolist()) <= set(range(4))
    # teacher targets: a fixed function of X (the same X, teacher for each seed)
    _, Ya = sphere(2000, 8, k=1, seed=0, target="teacher", dtype=DT)
    assert Ya.shape == (2000, 1)
    assert 0.2 < float(Ya.pow(2).mean()) < 5
    teach = [sphere(2000, 8, seed=s, target="teacher", dtype=DT)[1] for s in range(1, 9)]
    assert 0.5 < float(torch.stack(teach).pow(2).mean()) < 2  # variance 1 over teachers
    with pytest.raises(InvalidArgumentError, match="k=1"):
        sphere(5, 3, target="labels")
    with pytest.raises(InvalidArgumentError, match="target='noise'"):
        sphere(5, 3, target="noise")


# ------------------------------------------------------------------ MNIST: IDX files on disk
def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _mnist_files(root, gz: bool, n_train: int = 6, n_test: int = 4):
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = labels * 20 + np.arange(n)  # tie each image to its label
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files(tmp_path, gz):
    files = _mnist_files(tmp_path, gz)
    images, labels = files["train"]
    X, Y = mnist(tmp_path, dtype=DT)
    assert X.shape == (6, 1, 28, 28) and Y.shape == (6, 10)
    v = images.astype(np.float64) / 255
    expect = (v - v.mean()) / v.std()
    assert np.allclose(X[:, 0].numpy(), expect, rtol=0, atol=1e-12)
    assert Y.argmax(1).tolist() == labels.tolist()
    Xt, yt = mnist(tmp_path, train=False, one_hot=False, flatten=True)
    assert Xt.shape == (4, 784) and yt.tolist() == files["t10k"][1].tolist()
    Xs, ys = mnist(tmp_path, n=3, seed=1, one_hot=False, dtype=DT)
    for xi, yi in zip(Xs, ys, strict=True):
        i = int(np.nonzero(np.isclose(expect[:, 0, 0], float(xi[0, 0, 0])))[0][0])
        assert labels[i] == yi


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _mnist_files(raw, gz=False)
    assert mnist(tmp_path)[0].shape == (6, 1, 28, 28)


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:  # DataNotFoundError
        mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "train-images-idx3-ubyte") in msg and "t10k-labels-idx1-ubyte" in msg
    with pytest.raises(InvalidArgumentError, match="root=None"):
        mnist(None)
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        mnist(tmp_path / "nowhere")
    _mnist_files(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(InvalidArgumentError, match="magic number 00000803"):
        mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(ShapeMismatchError, match="6 images but 5 labels"):
        mnist(tmp_path)


# ------------------------------------------------------------------ CIFAR: pickled batches
def _pickle(path, d: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _cifar10_files(root, per_batch: int = 2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / name, {b"batch_label": name.encode(), b"data": data, b"labels": labels})
        out[name] = (data, labels)
    return out


def _channel_standardized(data: np.ndarray) -> np.ndarray:
    v = data.reshape(-1, 3, 32, 32).astype(np.float64) / 255
    mean, std = v.mean(axis=(0, 2, 3), keepdims=True), v.std(axis=(0, 2, 3), keepdims=True)
    return (v - mean) / std


def test_cifar10_reads_pickled_batches(tmp_path):
    files = _cifar10_files(tmp_path)
    data = np.concatenate([files[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = [lab for i in range(1, 6) for lab in files[f"data_batch_{i}"][1]]
    X, Y = cifar10(tmp_path, dtype=DT)
    assert X.shape == (10, 3, 32, 32) and Y.shape == (10, 10)
    assert np.allclose(X.numpy(), _channel_standardized(data), rtol=0, atol=1e-12)
    assert torch.allclose(X.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DT), atol=1e-12)
    assert Y.argmax(1).tolist() == labels
    Xt, yt = cifar10(tmp_path / "cifar-10-batches-py", train=False, one_hot=False, flatten=True)
    assert Xt.shape == (2, 3072) and yt.tolist() == files["test_batch"][1]
    Xs, ys = cifar10(tmp_path, n=4, seed=2, one_hot=False, dtype=DT)
    for xi, yi in zip(Xs, ys, strict=True):
        i = int(torch.nonzero((xi == X).flatten(1).all(1))[0])
        assert labels[i] == int(yi)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 5), ("test", 3)):
        _pickle(
            folder / name,
            {
                b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                b"fine_labels": [99, 0, 42, 7, 13][:n],
                b"coarse_labels": [19, 0, 4, 3, 2][:n],
            },
        )
    X, Y = cifar100(tmp_path, dtype=DT)
    assert X.shape == (5, 3, 32, 32) and Y.shape == (5, 100)
    assert Y.argmax(1).tolist() == [99, 0, 42, 7, 13]
    _, yc = cifar100(tmp_path, train=False, coarse=True, one_hot=False)
    assert yc.tolist() == [19, 0, 4]
    assert cifar100(tmp_path, coarse=True)[1].shape == (5, 20)


def test_cifar_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:  # DataNotFoundError
        cifar10(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "python" in msg
    with pytest.raises(InvalidArgumentError, match="cifar-100-python"):
        cifar100(tmp_path, train=False)
    files = _cifar10_files(tmp_path)
    data, _ = files["test_batch"]
    _pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": data})
    with pytest.raises(InvalidArgumentError, match="'labels'"):
        cifar10(tmp_path, train=False)
    _pickle(
        tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": data[:, :100], b"labels": [0, 1]}
    )
    with pytest.raises(InvalidArgumentError, match=r"\(N, 3072\)"):
        cifar10(tmp_path, train=False)


# ------------------------------------------------------------------ dispatch
def test_load_dataset_dispatch(tmp_path):
    assert DATASETS == ("digits", "mnist1d", "sphere", "mnist", "cifar10", "cifar100")
    X, Y = load_dataset("digits", n=8, seed=2, dtype=DT)
    X0, Y0 = digits(8, seed=2, dtype=DT)
    assert torch.equal(X, X0) and torch.equal(Y, Y0)
    assert load_dataset("digits", n=8, flatten=False)[0].shape == (8, 1, 8, 8)
    assert load_dataset("mnist1d", n=8)[0].shape == (8, 40)
    assert load_dataset("mnist1d", n=8, flatten=False, train=False)[0].shape == (8, 1, 40)
    _, Ys = load_dataset("sphere", n=7, d=3, k=2, target="teacher", seed=1)
    assert torch.equal(Ys, sphere(7, 3, k=2, target="teacher", seed=1)[1])
    _mnist_files(tmp_path, gz=True)
    assert load_dataset("mnist", root=tmp_path)[0].shape == (6, 1, 28, 28)
    Xm, ym = load_dataset("mnist", root=tmp_path, flatten=True, one_hot=False, train=False)
    assert Xm.shape == (4, 784) and ym.dtype == torch.long
    _cifar10_files(tmp_path)
    assert load_dataset("cifar10", root=tmp_path, n=3)[0].shape == (3, 3, 32, 32)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value) and all(name in str(err.value) for name in DATASETS)
    with pytest.raises(InvalidArgumentError, match="'width'"):
        load_dataset("digits", width=3)
    with pytest.raises(InvalidArgumentError, match="sphere needs"):
        load_dataset("sphere", n=5)
    with pytest.raises(InvalidArgumentError, match="no test split"):
        load_dataset("digits", train=False)
    with pytest.raises(InvalidArgumentError, match="drop root"):
        load_dataset("digits", root=tmp_path)
    with pytest.raises(InvalidArgumentError, match="root=None"):
        load_dataset("cifar100")


def test_as_dataset():
    X, Y = as_dataset(np.ones((4, 3)), np.array([0, 2, 1, 2]), one_hot=True)
    assert (
        X.dtype == DT and Y.shape == (4, 3) and torch.equal(Y.argmax(1), torch.tensor([0, 2, 1, 2]))
    )
    X, y = as_dataset(torch.ones(4, 3), [0, 1, 1, 0])
    assert X.dtype == torch.float32 and y.dtype == torch.long
    X, Y = as_dataset(torch.ones(4, 3, dtype=torch.int64), torch.zeros(4, 2, dtype=DT), dtype=DT)
    assert X.dtype == DT and Y.dtype == DT
    assert as_dataset(torch.ones(2, 1), [1, 0], one_hot=True, num_classes=5)[1].shape == (2, 5)
    with pytest.raises(ShapeMismatchError, match="4 samples"):
        as_dataset(torch.ones(4, 3), torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="num_classes=2"):
        as_dataset(torch.ones(2, 1), [3, 0], num_classes=2)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        as_dataset(torch.tensor([[float("nan")]]), [0])
    with pytest.raises(InvalidArgumentError, match="one_hot=True"):
        as_dataset(torch.ones(2, 1), torch.zeros(2), one_hot=True)
