"""gdscope.problem.Problem: reductions, data sources, q / Q, losses, errors and module state.

Oracles are independent of gdscope (see ``conftest.Oracle``): PyTorch's functional losses on
``functional_call`` outputs, differentiated by ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gdscope as gs
from conftest import DT, K_OUT, N, class_data, make_cnn, make_mlp, regression_data
from gdscope.curvature import curvature_operator
from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    NonFiniteError,
    ShapeMismatchError,
    StatefulModuleError,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"  # torch's forward-AD import
)


def data_for(loss: str):
    return regression_data() if loss == "mse" else class_data()


def op_dense(prob: gs.Problem, curvature: str) -> torch.Tensor:
    op = curvature_operator(prob, curvature)
    return op.matmat(torch.eye(prob.num_params, dtype=prob.dtype))


# ---------------------------------------------------------------------- basics
def test_counts_and_flatten_roundtrip(mlp_mse, oracle):
    assert mlp_mse.n == N
    assert mlp_mse.num_outputs == K_OUT
    assert mlp_mse.num_params == sum(p.numel() for p in mlp_mse.model.parameters()) == 165
    assert mlp_mse.names == oracle.names(mlp_mse.model)
    flat = mlp_mse.flatten(mlp_mse.params)
    assert torch.equal(flat, oracle.flat(mlp_mse.model))
    back = mlp_mse.unflatten(flat)
    for n, p in mlp_mse.model.named_parameters():
        assert torch.equal(back[n], p.detach())
    with pytest.raises(ShapeMismatchError):
        mlp_mse.unflatten(flat[:-1])
    with pytest.raises(ShapeMismatchError):
        mlp_mse.unflatten(flat.reshape(5, 33))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradient_vs_oracle(oracle, loss, reduction):
    X, Y = data_for(loss)
    model = make_mlp()
    prob = gs.Problem(model, loss, (X, Y), reduction=reduction)
    ref = oracle.loss_fn(model, X, Y, loss, reduction)(oracle.flat(model))
    assert prob.loss().item() == pytest.approx(ref.item(), rel=1e-13)
    g = oracle.gradient(model, X, Y, loss, reduction)
    assert torch.allclose(prob.gradient(), g, rtol=1e-11, atol=1e-13)
    out = prob.outputs()
    assert out.shape == (N, K_OUT)
    assert torch.allclose(out, model(X))


@pytest.mark.parametrize(("loss", "factor"), [("mse", N * K_OUT), ("cross_entropy", N)])
def test_sum_is_scaled_mean(loss, factor):
    """Sum-reduction Hessian = n·k·mean for MSE (mse_loss divides by nk), n·mean for CE."""
    X, Y = data_for(loss)
    mean = gs.Problem(make_mlp(), loss, (X, Y), reduction="mean")
    summ = gs.Problem(make_mlp(), loss, (X, Y), reduction="sum")
    assert summ.loss().item() == pytest.approx(factor * mean.loss().item(), rel=1e-13)
    assert torch.allclose(summ.gradient(), factor * mean.gradient(), rtol=1e-11, atol=1e-13)
    Hm, Hs = gs.dense_hessian(mean), gs.dense_hessian(summ)
    assert torch.allclose(Hs, factor * Hm, rtol=1e-10, atol=1e-12 * Hs.abs().max().item())
    Gm, Gs = op_dense(mean, "ggn"), op_dense(summ, "ggn")
    assert torch.allclose(Gs, factor * Gm, rtol=1e-10, atol=1e-12 * Gs.abs().max().item())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataloader_with_uneven_last_batch_matches_full_batch(oracle, loss, reduction):
    X, Y = data_for(loss)
    loader = DataLoader(TensorDataset(X, Y), batch_size=7)  # 7, 7, 6
    assert [len(b[0]) for b in loader] == [7, 7, 6]
    full = gs.Problem(make_mlp(), loss, (X, Y), reduction=reduction)
    batched = gs.Problem(make_mlp(), loss, loader, reduction=reduction)
    assert batched.full_batch is None and batched.n == N
    weights = [w for *_, w in batched.batches()]
    if reduction == "mean":
        assert weights == pytest.approx([7 / 20, 7 / 20, 6 / 20])
        assert sum(weights) == pytest.approx(1.0)
    else:
        assert weights == [1.0, 1.0, 1.0]
    assert batched.loss().item() == pytest.approx(full.loss().item(), rel=1e-13)
    assert torch.allclose(batched.gradient(), full.gradient(), rtol=1e-11, atol=1e-14)
    assert torch.allclose(batched.outputs(), full.outputs())
    H_full, H_b = gs.dense_hessian(full), gs.dense_hessian(batched)
    scale = H_full.abs().max().item()
    assert torch.allclose(H_b, H_full, rtol=0, atol=1e-12 * scale)
    H_ref = oracle.hessian(full.model, X, Y, loss, reduction)
    assert torch.allclose(H_full, H_ref, rtol=0, atol=1e-11 * scale)
    G_full, G_b = op_dense(full, "ggn"), op_dense(batched, "ggn")
    assert torch.allclose(G_b, G_full, rtol=0, atol=1e-12 * G_full.abs().max().item())
    if loss == "mse":
        assert batched.q == full.q


def test_q_values():
    X, Y = regression_data()
    assert gs.Problem(make_mlp(), "mse", (X, Y)).q == pytest.approx(2 / (N * K_OUT), rel=1e-15)
    assert gs.Problem(make_mlp(), "mse", (X, Y), reduction="sum").q == 2.0
    Xc, Yc = class_data()
    with pytest.raises(InvalidArgumentError):
        _ = gs.Problem(make_mlp(), "cross_entropy", (Xc, Yc)).q


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_hessian_vs_autograd(oracle, loss, reduction):
    X, Y = data_for(loss)
    model = make_mlp()
    prob = gs.Problem(model, loss, (X, Y), reduction=reduction)
    out = prob.outputs()
    crit = oracle.criterion(loss, reduction)
    full = torch.autograd.functional.hessian(lambda o: crit(o, Y), out)  # (n, k, n, k)
    assert full.shape == (N, K_OUT, N, K_OUT)
    blocks = torch.stack([full[i, :, i, :] for i in range(N)])
    Q = prob.output_hessian(out, Y)
    assert Q.shape == (N, K_OUT, K_OUT)
    assert torch.allclose(Q, blocks, rtol=1e-12, atol=1e-15)
    # the loss is separable: all the curvature is in the diagonal blocks
    assert torch.allclose(torch.block_diag(*Q), full.reshape(N * K_OUT, N * K_OUT), atol=1e-15)
    # and it is the closed form (q·I for MSE; (diag p − p pᵀ)/n for CE)
    closed = oracle.output_curvature(model, X, Y, loss, reduction)
    assert torch.allclose(torch.block_diag(*Q), closed, rtol=1e-12, atol=1e-15)
    if loss == "mse":
        assert torch.allclose(Q, prob.q * torch.eye(K_OUT, dtype=DT).expand(N, -1, -1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_hessian_with_batch_weights(reduction):
    """Per-batch blocks with the batch weights w_b reassemble the full-batch Q."""
    X, Yc = class_data()
    loader = DataLoader(TensorDataset(X, Yc), batch_size=7)
    full = gs.Problem(make_mlp(), "cross_entropy", (X, Yc), reduction=reduction)
    batched = gs.Problem(make_mlp(), "cross_entropy", loader, reduction=reduction)
    out = full.outputs()
    Q_full = full.output_hessian(out, Yc)
    parts = [batched.output_hessian(batched.model(x), y, w) for x, y, w in batched.batches()]
    assert torch.allclose(torch.cat(parts), Q_full, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_callable_and_module_losses_match_named(loss):
    X, Y = data_for(loss)
    fn = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    module = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    named = gs.Problem(make_mlp(), loss, (X, Y))
    H = gs.dense_hessian(named)
    for other in (module, lambda o, t: fn(o, t)):
        prob = gs.Problem(make_mlp(), other, (X, Y))
        assert prob.loss().item() == pytest.approx(named.loss().item(), rel=1e-14)
        assert torch.allclose(prob.gradient(), named.gradient(), rtol=1e-12, atol=1e-15)
        assert torch.allclose(gs.dense_hessian(prob), H, rtol=0, atol=1e-12 * H.abs().max())
    summ = gs.Problem(make_mlp(), lambda o, t: fn(o, t, reduction="sum"), (X, Y), reduction="sum")
    named_sum = gs.Problem(make_mlp(), loss, (X, Y), reduction="sum")
    assert summ.loss().item() == pytest.approx(named_sum.loss().item(), rel=1e-14)


@pytest.mark.parametrize("kind", ["module", "callable"])
def test_ggn_with_module_or_callable_mse(kind):
    X, Y = regression_data()
    loss = nn.MSELoss() if kind == "module" else (lambda o, t: nn.functional.mse_loss(o, t))
    ref = op_dense(gs.Problem(make_mlp(), "mse", (X, Y)), "ggn")
    G = op_dense(gs.Problem(make_mlp(), loss, (X, Y)), "ggn")
    assert torch.allclose(G, ref, rtol=0, atol=1e-12 * ref.abs().max())


@pytest.mark.parametrize("kind", ["module", "callable"])
def test_ggn_with_module_or_callable_cross_entropy(kind):
    X, Y = class_data()
    loss = (
        nn.CrossEntropyLoss()
        if kind == "module"
        else (lambda o, t: nn.functional.cross_entropy(o, t))
    )
    ref = op_dense(gs.Problem(make_mlp(), "cross_entropy", (X, Y)), "ggn")
    G = op_dense(gs.Problem(make_mlp(), loss, (X, Y)), "ggn")
    assert torch.allclose(G, ref, rtol=0, atol=1e-12 * ref.abs().max())


def test_dtype_conversion_float32_model(oracle):
    """A float32 model measured in float64: parameters converted, the model left untouched."""
    X, Y = regression_data()
    m32 = make_mlp().float()
    before = [p.detach().clone() for p in m32.parameters()]
    prob = gs.Problem(m32, "mse", (X.float(), Y.float()), dtype=torch.float64)
    assert prob.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in prob.params.values())
    m64 = make_mlp().float().double()  # the same float32 values, widened
    H = gs.dense_hessian(prob)
    H_ref = oracle.hessian(m64, X.float().double(), Y.float().double())
    assert torch.allclose(H, H_ref, rtol=0, atol=1e-11 * H_ref.abs().max())
    assert all(torch.equal(a, p) for a, p in zip(before, m32.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in m32.parameters())


def test_measurements_do_not_move_parameters(mlp_mse):
    before = {n: p.detach().clone() for n, p in mlp_mse.model.named_parameters()}
    gs.hessian_eigs(mlp_mse, 2, "both")
    gs.dense_hessian(mlp_mse)
    gs.hessian_trace(mlp_mse, 12)
    op_dense(mlp_mse, "ggn")
    for n, p in mlp_mse.model.named_parameters():
        assert torch.equal(before[n], p.detach())
        assert p.grad is None


# ---------------------------------------------------------------------- errors
def test_unknown_loss_name():
    X, Y = regression_data()
    with pytest.raises(InvalidArgumentError, match="huber"):
        gs.Problem(make_mlp(), "huber", (X, Y))
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), 3, (X, Y))


def test_module_loss_reduction_must_agree():
    X, Y = regression_data()
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), nn.MSELoss(reduction="sum"), (X, Y), reduction="mean")


@pytest.mark.parametrize("kwargs", [{"reduction": "none"}, {"dtype": torch.int64}, {"data": None}])
def test_bad_constructor_arguments(kwargs):
    X, Y = regression_data()
    data = kwargs.pop("data", (X, Y))
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), "mse", data, **kwargs)


def test_not_a_module():
    X, Y = regression_data()
    with pytest.raises(InvalidArgumentError):
        gs.Problem(lambda x: x, "mse", (X, Y))


def test_model_without_trainable_parameters():
    X, Y = regression_data()
    model = make_mlp().requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match="trainable"):
        gs.Problem(model, "mse", (X, Y))
    with pytest.raises(InvalidArgumentError):
        gs.Problem(nn.Tanh(), "mse", (X, Y))


def test_frozen_layer_is_excluded(oracle):
    X, Y = regression_data()
    model = make_mlp()
    model[0].requires_grad_(False)
    prob = gs.Problem(model, "mse", (X, Y))
    assert prob.num_params == 165 - 50
    assert prob.names == oracle.names(model)
    H = gs.dense_hessian(prob)
    assert torch.allclose(H, oracle.hessian(model, X, Y), atol=1e-12 * H.abs().max())


def test_input_shape_mismatch():
    X, Y = regression_data(d=5)
    with pytest.raises(ShapeMismatchError):
        gs.Problem(make_mlp(), "mse", (X, Y))
    Xi = torch.randn(4, 1, 5, 5, dtype=DT)
    with pytest.raises(ShapeMismatchError):
        gs.Problem(make_cnn(), "mse", (Xi, torch.randn(4, K_OUT, dtype=DT)))


def test_target_shape_mismatch():
    X, _ = regression_data()
    with pytest.raises(ShapeMismatchError):
        gs.Problem(make_mlp(), "mse", (X, torch.randn(N, K_OUT + 1, dtype=DT)))
    with pytest.raises(ShapeMismatchError):
        gs.Problem(make_mlp(), "mse", (X, torch.randint(0, K_OUT, (N,))))


def test_mismatched_lengths():
    X, Y = regression_data()
    with pytest.raises(ShapeMismatchError):
        gs.Problem(make_mlp(), "mse", (X, Y[:-1]))


@pytest.mark.parametrize(
    "data",
    [
        (torch.zeros(0, 4, dtype=DT), torch.zeros(0, 3, dtype=DT)),
        [],
        DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 3)), batch_size=4),
    ],
    ids=["empty-tensors", "empty-list", "empty-loader"],
)
def test_empty_data(data):
    with pytest.raises(InvalidArgumentError, match="empty"):
        gs.Problem(make_mlp(), "mse", data)


def test_single_tensor_data():
    X, _ = regression_data()
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), "mse", X)


def test_bad_batches_in_iterable():
    X, _ = regression_data()
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), "mse", [X])


@pytest.mark.parametrize(("k", "which"), [(166, "largest"), (200, "smallest"), (83, "both")])
def test_hessian_eigs_k_larger_than_params(mlp_mse, k, which):
    assert mlp_mse.num_params == 165
    with pytest.raises(InvalidArgumentError):
        gs.hessian_eigs(mlp_mse, k, which)


def test_nonfinite_point():
    X, Y = regression_data()
    model = make_mlp()
    with torch.no_grad():
        model[-1].bias.fill_(float("inf"))
    # refused where the model enters (it used to be accepted and fail later, in hessian_eigs)
    with pytest.raises(NonFiniteError, match=r"parameter '4\.bias'.*\+inf"):
        gs.Problem(model, "mse", (X, Y))
    # parameters are live: a point that becomes non-finite after construction is still refused
    model = make_mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    with torch.no_grad():
        model[-1].bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        gs.hessian_eigs(prob)


# ---------------------------------------------------------------------- module state
def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, K_OUT)).to(DT)


def test_train_mode_batchnorm_refused():
    X, Y = regression_data()
    prob = gs.Problem(bn_model(), "mse", (X, Y))
    with pytest.raises(StatefulModuleError, match="allow_stateful"):
        prob.check()
    with pytest.raises(StatefulModuleError):
        gs.hessian_eigs(prob)
    with pytest.raises(StatefulModuleError):
        gs.hessian_density(prob, 2, 5)
    with pytest.raises(StatefulModuleError):
        curvature_operator(prob, "ggn")


def test_train_mode_batchnorm_allowed_keeps_running_stats(oracle):
    X, Y = regression_data()
    model = bn_model()
    prob = gs.Problem(model, "mse", (X, Y), allow_stateful=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert set(before) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    prob.check(force=True)
    prob.loss()
    prob.gradient()
    prob.outputs()
    res = gs.hessian_eigs(prob, 2, "both", tol=1e-10)
    H = gs.dense_hessian(prob)
    op_dense(prob, "ggn")
    gs.hessian_trace(prob, 12)
    gs.hessian_density(prob, 2, 10)
    gs.gd_map(prob, 0.1)
    gs.gd_map(prob, 0.1, dense_limit=0, slq_vectors=2, slq_steps=5)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert model.training and model[1].training
    # the train-mode operator is the batch-statistics Hessian
    H_ref = oracle.hessian(model, X, Y)
    assert torch.allclose(H, H_ref, rtol=0, atol=1e-11 * H_ref.abs().max())
    exact = torch.linalg.eigvalsh(H_ref)
    want = torch.cat([exact[:2], exact[-2:]])
    assert torch.allclose(res.values, want, atol=1e-8 * exact.abs().max())


def test_eval_mode_batchnorm_works(oracle):
    X, Y = regression_data()
    model = bn_model()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    prob = gs.Problem(model, "mse", (X, Y))
    H = gs.dense_hessian(prob)
    H_ref = oracle.hessian(model, X, Y)
    assert torch.allclose(H, H_ref, rtol=0, atol=1e-11 * H_ref.abs().max())


def test_train_mode_dropout_refused_eval_works(oracle):
    X, Y = regression_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT)
    prob = gs.Problem(model, "mse", (X, Y))
    with pytest.raises(NonDeterministicError, match="eval"):
        gs.hessian_eigs(prob)
    with pytest.raises(NonDeterministicError):
        curvature_operator(prob, "ggn")
    model.eval()
    prob = gs.Problem(model, "mse", (X, Y))
    res = gs.hessian_eigs(prob, 1, tol=1e-10)
    exact = torch.linalg.eigvalsh(oracle.hessian(model, X, Y))
    assert abs(res.values[0] - exact[-1]) < 1e-8 * exact.abs().max()


def test_subset():
    X, Y = regression_data()
    prob = gs.Problem(make_mlp(), "mse", (X, Y))
    sub = prob.subset(torch.arange(5))
    ref = gs.Problem(make_mlp(), "mse", (X[:5], Y[:5]))
    assert sub.n == 5 and sub.q == pytest.approx(2 / (5 * K_OUT))
    assert sub.loss().item() == pytest.approx(ref.loss().item(), rel=1e-14)
    with pytest.raises(InvalidArgumentError):
        prob.subset(torch.tensor([N]))
    loader = DataLoader(TensorDataset(X, Y), batch_size=7)
    with pytest.raises(InvalidArgumentError):
        gs.Problem(make_mlp(), "mse", loader).subset(torch.arange(3))
