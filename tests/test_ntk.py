"""Empirical NTK (gdscope.kernels.ntk) against a dense float64 J Jᵀ from torch.func.jacrev."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    ShapeMismatchError,
    StatefulModuleError,
)
from gdscope.kernels.ntk import _explain, _prepare, _run, ntk, ntk_blocks

RTOL = 1e-9
METHODS = ["structured", "jacobian", "vp", "auto"]


def dense_ntk(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: full-batch ``jacrev`` over the parameters, ``J J2ᵀ`` as ``(n, n2, k, k)``."""
    x2 = x if x2 is None else x2
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def jac(xx: torch.Tensor) -> torch.Tensor:
        def f(p):
            return functional_call(model, (p, buffers), (xx,)).reshape(xx.shape[0], -1)

        j = jacrev(f)(params)
        return torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in j.values()], -1)

    return torch.einsum("iap,jbp->ijab", jac(x), jac(x2))


def assert_close(K: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert K.shape == ref.shape, (K.shape, ref.shape)
    err = (K - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------------
# Models (float64, eval mode, small)


class Shared(nn.Module):
    """The same Linear applied twice (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.lin(h))
        h = torch.tanh(self.lin(h))
        return self.head(h)


class Tied(nn.Module):
    """Embedding and output layer share one weight (language-model style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.mid(self.emb(idx))).mean(1)
        return self.out(h)


class OutsideUse(nn.Module):
    """A Linear whose weight is also used functionally outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x) + 0.5 * F.linear(x, self.lin.weight))
        return self.head(h)


class Custom(nn.Module):
    """A module with its own parameter (no rule) around covered layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) * self.scale))


class SeqLN(nn.Module):
    """Linear on (n, T, d) (weight shared over T), LayerNorm, RMSNorm, flattened head."""

    def __init__(self, rms: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.norm = nn.RMSNorm(6) if rms else nn.LayerNorm(6)
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.lin(x)))
        return self.head(h.flatten(1))


class EmbModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(20, 3)

    def forward(self, idx):
        h = torch.tanh(self.lin(self.emb(idx)))  # (n, 4, 5)
        return self.head(h.flatten(1))


class ResBlock(nn.Module):
    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = torch.relu(out + x)
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ImagesConv(nn.Module):
    """A sample is a pair of images: both go through the same convolutions (the rule sees
    ``B = 2`` images per sample), then one readout of both."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(3, 2, 2, stride=2, dilation=1)
        self.head = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.c2(torch.tanh(self.c1(x.reshape(n * 2, 2, 5, 5))))
        return self.head(torch.tanh(h).reshape(n, -1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def make(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x, x2)`` for a named case; x2 has a different number of samples."""
    torch.manual_seed(0)
    img = (2, 6, 6)
    if name == "mlp_tanh_bias":
        m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
        shape = (5,)
    elif name == "mlp_relu_nobias":
        m = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
        shape = (5,)
    elif name == "cnn_pool_stride":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(1),
            nn.Conv2d(4, 5, 3, padding=1),
            nn.MaxPool2d(3),
            nn.Flatten(),
            nn.Linear(5, 3),
        )
        shape = img
    elif name == "cnn_exotic":  # groups, 'same' + reflect padding, dilation
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
            nn.Tanh(),
            nn.Conv2d(6, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(18, 2),
        )
        shape = img
    elif name == "conv1d":
        m = nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=1),
            nn.Tanh(),
            nn.Conv1d(4, 4, 4, padding="same"),
            nn.Tanh(),
            nn.Conv1d(4, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        shape = (3, 8)
    elif name == "conv_images":  # each sample is 2 images (B = 2 per call); circular padding
        m = ImagesConv()
        shape = (2, 2, 5, 5)
    elif name == "embedding":
        m = EmbModel()
        x = torch.randint(0, 11, (5, 4))
        x[0, 1] = 0  # a padding token
        x2 = torch.randint(0, 11, (3, 4))
        return m.double().eval(), x, x2
    elif name == "tied":
        m = Tied()
        return m.double().eval(), torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (4, 3))
    elif name == "shared":
        m, shape = Shared(), (4,)
    elif name == "outside_use":
        m, shape = OutsideUse(), (4,)
    elif name == "custom_param":
        m, shape = Custom(), (4,)
    elif name == "layernorm":
        m, shape = SeqLN(), (3, 5)
    elif name == "rmsnorm":
        m, shape = SeqLN(rms=True), (3, 5)
    elif name == "groupnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        )
        shape = img
    elif name == "batchnorm_eval":
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.BatchNorm1d(5),
            nn.Tanh(),
            nn.Linear(5, 2),
        )
        m = _randomise_bn(m)
        shape = img
    elif name == "resnet_block":
        m, shape = _randomise_bn(ResBlock()), img
    elif name == "frozen":
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        m[0].weight.requires_grad_(False)
        shape = (5,)
    else:
        raise KeyError(name)
    m = m.double().eval()
    return (
        m,
        torch.randn(5, *shape, dtype=torch.float64),
        torch.randn(3, *shape, dtype=torch.float64),
    )


COVERED = [
    "mlp_tanh_bias",
    "mlp_relu_nobias",
    "cnn_pool_stride",
    "cnn_exotic",
    "conv1d",
    "conv_images",
    "embedding",
    "layernorm",
    "groupnorm",
    "batchnorm_eval",
    "resnet_block",
    "frozen",
]
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    COVERED.append("rmsnorm")
MIXED = ["shared", "tied", "outside_use", "custom_param"]
ALL = COVERED + MIXED


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", ALL)
def test_methods_match_dense_jacobian(name):
    model, x, _ = make(name)
    ref = dense_ntk(model, x)
    for method in METHODS:
        if method == "structured" and name in MIXED:
            continue
        assert_close(ntk(model, x, method=method), ref)


@pytest.mark.parametrize("name", ALL)
def test_cross_kernel_and_trace(name):
    """``x2 != x`` (different n2) and the trace kernel, every method."""
    model, x, x2 = make(name)
    ref = dense_ntk(model, x, x2)
    ref_tr = torch.diagonal(ref, dim1=2, dim2=3).sum(-1)
    ref_sym_tr = torch.diagonal(dense_ntk(model, x), dim1=2, dim2=3).sum(-1)
    for method in METHODS:
        if method == "structured" and name in MIXED:
            continue
        assert_close(ntk(model, x, x2, method=method), ref)
        assert_close(ntk(model, x, x2, method=method, trace_outputs=True), ref_tr)
        assert_close(ntk(model, x, method=method, trace_outputs=True), ref_sym_tr)


@pytest.mark.parametrize(
    "name",
    [
        "mlp_tanh_bias",
        "cnn_pool_stride",
        "cnn_exotic",
        "conv1d",
        "conv_images",
        "embedding",
        "layernorm",
    ],
)
@pytest.mark.parametrize("route", ["gram", "pair", "jac"])
def test_every_route_of_the_affine_rules(name, route):
    """Force each exact route (position Gram, pair contraction, per-sample Jacobian)."""
    model, x, x2 = make(name)
    for xx2 in (None, x2):
        ref = dense_ntk(model, x, xx2)
        for trace in (False, True):
            job, out = _prepare(model, x, xx2, "structured", trace, None, None, force=route)
            K = _run(job, out)
            assert_close(K, torch.diagonal(ref, dim1=2, dim2=3).sum(-1) if trace else ref)


def test_auto_plan_uses_rules_and_falls_back_where_needed():
    model, x, _ = make("shared")
    info = _explain(model, x)
    mods = " | ".join(info["modules"])
    assert "inp (Linear): gram" in mods and "head (Linear): gram" in mods
    assert "lin: jacobian (called 2 times per forward)" in mods
    model, x, _ = make("outside_use")
    assert "gradient check failed" in " | ".join(_explain(model, x)["modules"])
    model, x, _ = make("tied")
    assert "shared with another module" in " | ".join(_explain(model, x)["modules"])
    model, x, _ = make("cnn_pool_stride")
    info = _explain(model, x)
    assert all("jacobian" not in m for m in info["modules"])


@pytest.mark.parametrize("name", MIXED)
def test_structured_refuses_uncovered_parameters(name):
    model, x, _ = make(name)
    with pytest.raises(InvalidArgumentError, match="method='auto'"):
        ntk(model, x, method="structured")


def test_float32_follows_model_dtype():
    model, x, x2 = make("cnn_pool_stride")
    ref = dense_ntk(model, x, x2)
    m32 = model.float()
    for method in METHODS:
        K = ntk(m32, x.float(), x2.float(), method=method)
        assert K.dtype == torch.float32
        assert_close(K.double(), ref, rtol=1e-4)
    # float64 inputs are cast to the model's dtype
    assert ntk(m32, x, method="auto").dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Tiling, out=, blocks


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_small_memory_tiles_and_streams_features(method):
    """A budget too small to hold every sample's features: tiles, recomputed per tile pair
    (``auto`` may take the NTK-vector products instead, which need no features: measured
    faster here at one thread, 0.48 s against 1.0 s structured and 0.62 s jacobian)."""
    model, _, x2 = make("resnet_block")
    x = torch.randn(48, 2, 6, 6, dtype=torch.float64)
    job, _ = _prepare(model, x, None, method, False, 10**9, None)
    mem = int(4.4 * job.plan.capture_bytes())  # enough for one capture, not for all features
    assert 48 * job.plan.feature_bytes() > mem / 2
    info = _explain(model, x, method=method, memory=mem + 48 * 48 * 4 * 8)
    if info["method"] == "vp":
        assert method == "auto" and info["route"] == "vp"
        secs = {r: c["seconds"] for r, c in info["predicted"].items()}
        assert secs["vp"] == min(secs.values())
    else:
        assert not info["cached"] and info["tile"] < 48
    ref = dense_ntk(model, x)
    out = torch.empty(48, 48, 2, 2, dtype=torch.float64)
    assert_close(ntk(model, x, method=method, memory=mem, out=out), ref)
    ref2 = dense_ntk(model, x, x2)
    out2 = torch.empty(48, 3, 2, 2, dtype=torch.float64)
    assert_close(ntk(model, x, x2, method=method, memory=mem, out=out2), ref2)
    tr = ntk(model, x, method=method, memory=mem, trace_outputs=True, out=torch.empty(48, 48))
    assert_close(tr.double(), torch.diagonal(ref, dim1=2, dim2=3).sum(-1), rtol=1e-6)


def test_out_tensor_and_memmap(tmp_path):
    model, x, x2 = make("mlp_tanh_bias")
    ref = dense_ntk(model, x, x2)
    out = torch.full((5, 3, 3, 3), float("nan"), dtype=torch.float64)
    res = ntk(model, x, x2, out=out)
    assert res is out
    assert_close(out, ref)
    mm = np.lib.format.open_memmap(
        tmp_path / "K.npy", mode="w+", dtype=np.float64, shape=(5, 5, 3, 3)
    )
    ntk(model, x, out=torch.from_numpy(mm))
    mm.flush()
    assert_close(torch.from_numpy(np.load(tmp_path / "K.npy")), dense_ntk(model, x))
    with pytest.raises(ShapeMismatchError, match="out has shape"):
        ntk(model, x, out=torch.empty(5, 5, 3))
    with pytest.raises(InvalidArgumentError, match="floating"):
        ntk(model, x, out=torch.empty(5, 5, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("method", ["auto", "jacobian", "vp"])
def test_blocks_reassemble(method):
    model, x, x2 = make("conv1d")
    for xx2, trace in [(None, False), (x2, False), (None, True)]:
        ref = ntk(model, x, xx2, method="jacobian", trace_outputs=trace)
        K = torch.full_like(ref, float("nan"))
        seen = 0
        for i0, i1, j0, j1, blk in ntk_blocks(
            model, x, xx2, method=method, trace_outputs=trace, block_size=2
        ):
            K[i0:i1, j0:j1] = blk
            seen += blk.shape[0] * blk.shape[1]
        assert seen == ref.shape[0] * ref.shape[1]  # each entry exactly once
        assert_close(K, ref)


# ---------------------------------------------------------------------------------------------
# Refusals and bad input


def test_output_too_large_is_refused_before_allocating():
    model = nn.Linear(5, 4)
    x = torch.zeros(1, 5).expand(10_000_000, 5)  # 10^7 samples, no memory behind them
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgumentError) as e:
        ntk(model, x)
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    for word in ["GB", "trace_outputs=True", "out=", "ntk_blocks", "ntk_eigs"]:
        assert word in msg
    with pytest.raises(InvalidArgumentError, match="GB"):
        ntk(make("mlp_tanh_bias")[0], torch.randn(5, 5).double(), memory=1000)


def test_memory_too_small_for_one_tile_names_memory():
    model, x, _ = make("mlp_tanh_bias")
    with pytest.raises(InvalidArgumentError, match="memory="):
        ntk(model, x, memory=200, out=torch.empty(5, 5, 3, 3, dtype=torch.float64))


def test_bad_inputs():
    model, x, x2 = make("mlp_tanh_bias")
    with pytest.raises(InvalidArgumentError, match="method="):
        ntk(model, x, method="fast")
    with pytest.raises(InvalidArgumentError, match="floating"):
        ntk(model, torch.ones(4, 5, dtype=torch.int64))
    emb, idx, _ = make("embedding")
    with pytest.raises(InvalidArgumentError, match="integer"):
        ntk(emb, idx.double())
    with pytest.raises(ShapeMismatchError, match="x2 has per-sample shape"):
        ntk(model, x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ShapeMismatchError, match="per-sample shape"):
        ntk(model, torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="empty"):
        ntk(model, x[:0])
    with pytest.raises(InvalidArgumentError, match="x2 is empty"):
        ntk(model, x, x2[:0])
    with pytest.raises(InvalidArgumentError, match="x2 is on meta"):
        ntk(model, x, torch.empty(3, 5, device="meta"))
    with pytest.raises(InvalidArgumentError, match=r"x must be a torch\.Tensor"):
        ntk(model, x.numpy())
    with pytest.raises(InvalidArgumentError, match="memory"):
        ntk(model, x, memory=-1)
    with pytest.raises(InvalidArgumentError, match="trace_outputs"):
        ntk(model, x, trace_outputs="yes")


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        return self.lin(x), x


def test_model_must_return_a_tensor():
    with pytest.raises(InvalidArgumentError, match="not a tensor"):
        ntk(TupleOut().double(), torch.randn(3, 5, dtype=torch.float64))


def test_train_mode_batchnorm_and_dropout_refused():
    model, x, _ = make("batchnorm_eval")
    model.train()
    with pytest.raises(StatefulModuleError, match="eval"):
        ntk(model, x)
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(NonDeterministicError, match="eval"):
        ntk(drop, x)
    drop.eval()
    assert_close(ntk(drop, x), dense_ntk(drop, x))


class Counter(nn.Module):
    """A forward that updates a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_forward_that_changes_buffers_refused_and_restored():
    model = Counter().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(StatefulModuleError, match="calls"):
        ntk(model, x)
    assert model.calls.item() == 0


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cnn_pool_stride", "resnet_block", "embedding", "shared"])
def test_cuda_matches_cpu(name):
    model, x, x2 = make(name)
    ref = dense_ntk(model, x, x2)
    mc, xc, x2c = model.cuda(), x.cuda(), x2.cuda()
    for method in METHODS:
        if method == "structured" and name in MIXED:
            continue
        K = ntk(mc, xc, x2c, method=method)
        assert K.device.type == "cuda"
        assert_close(K.cpu(), ref)
    K32 = ntk(mc.float(), xc.float() if xc.is_floating_point() else xc, method="auto")
    assert K32.dtype == torch.float32
    assert_close(K32.double().cpu(), dense_ntk(model.double().cpu(), x), rtol=1e-3)
    with pytest.raises(InvalidArgumentError, match="x2 is on"):
        ntk(mc.double(), xc, x2)


@pytest.mark.parametrize("bias_var", [0.0, 0.3])
def test_ntk_parameterized_layers_have_a_structured_rule(bias_var):
    from gdscope.kernels.ntk import ntk as ntk_fn
    from gdscope.zoo import mlp

    model = mlp(
        [5, 16, 16, 3],
        "relu",
        seed=1,
        dtype=torch.float64,
        parameterization="ntk",
        bias_var=bias_var,
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for args in ((x,), (x, x2)):
        for trace in (False, True):
            ref = ntk_fn(model, *args, method="jacobian", trace_outputs=trace)
            got = ntk_fn(model, *args, method="structured", trace_outputs=trace)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
