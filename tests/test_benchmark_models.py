"""Tests of dattri.benchmark.models (architectures and training helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.datasets import create_char_datasets, load_digits_dataset
from dattri.benchmark.models import (
    GPT,
    MLP,
    SUPPORTED_MODELS,
    GPTConfig,
    LogisticRegression,
    LogisticRegressionMnist,
    MLPMnist,
    ResNet9,
    create_gpt_model,
    create_lr_model,
    create_mlp_model,
    create_model,
    create_resnet9_model,
    full_batch_objective,
    train_classifier,
    train_full_batch,
)
from dattri.benchmark.models.resnet9 import BasicBlock


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_gpt_config(**overrides) -> GPTConfig:
    params = {
        "vocab_size": 11,
        "block_size": 8,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
    }
    params.update(overrides)
    return GPTConfig(**params)


# ------------------------------------------------------------ logistic regression


def test_logistic_regression_shapes_and_params():
    model = LogisticRegressionMnist()
    assert n_params(model) == 7850
    assert set(dict(model.named_parameters())) == {"linear.weight", "linear.bias"}
    images = torch.randn(3, 1, 28, 28)
    logits = model(images)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(
        logits, images.reshape(3, -1) @ model.linear.weight.T + model.linear.bias
    )
    assert model(torch.randn(3, 784)).shape == (3, 10)
    assert model(torch.randn(784)).shape == (10,)
    assert n_params(LogisticRegression(64, 2)) == 130
    with pytest.raises(ValueError, match="in_dim"):
        LogisticRegression(0, 2)


def test_create_lr_model():
    assert isinstance(create_lr_model("mnist"), LogisticRegressionMnist)
    assert create_lr_model("digits").linear.weight.shape == (10, 64)
    assert create_lr_model("cifar2").linear.weight.shape == (2, 3072)
    assert create_lr_model("mnist", n_classes=3).linear.weight.shape == (3, 784)
    with pytest.raises(ValueError, match="Unknown dataset"):
        create_lr_model("imagenet")


# ------------------------------------------------------------------------- MLP


def test_mlp_mnist_matches_upstream_layout():
    model = MLPMnist()
    assert n_params(model) == 109386
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]
    assert model.dropout1.p == model.dropout2.p == 0.1
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_mlp_forward_matches_manual_computation():
    torch.manual_seed(0)
    model = MLP(5, hidden=(7, 3), n_classes=4).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    h = torch.relu(x @ model.fc1.weight.T + model.fc1.bias)
    h = torch.relu(h @ model.fc2.weight.T + model.fc2.bias)
    expected = h @ model.fc3.weight.T + model.fc3.bias
    torch.testing.assert_close(model(x), expected)
    linear = MLP(5, hidden=(), n_classes=2)
    assert [n for n, _ in linear.named_parameters()] == ["fc1.weight", "fc1.bias"]


def test_mlp_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = MLP(20, hidden=(64,), n_classes=3, dropout=0.5)
    x = torch.randn(8, 20)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="dropout"):
        MLP(4, dropout=1.0)
    with pytest.raises(ValueError, match="sizes"):
        MLP(4, hidden=(0,))


def test_create_mlp_model():
    assert isinstance(create_mlp_model("mnist"), MLPMnist)
    assert create_mlp_model("mnist", dropout_rate=0.0).dropout1.p == 0.0
    model = create_mlp_model("digits", hidden=(32,))
    assert model.fc1.weight.shape == (32, 64)
    assert model.fc2.weight.shape == (10, 32)
    with pytest.raises(ValueError, match="Unknown dataset"):
        create_mlp_model("nope")


# ---------------------------------------------------------------------- ResNet-9


def expected_resnet9_params(num_classes: int, in_channels: int = 3) -> int:
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(in_channels, 64, 3) + bn(64)
    for cin, cout in [(64, 128), (128, 256), (256, 512)]:
        total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
        total += conv(cin, cout, 1) + bn(cout)  # projection shortcut
    return total + 512 * num_classes + num_classes


def test_resnet9_parameter_count_and_names():
    model = ResNet9(num_classes=10)
    assert n_params(model) == expected_resnet9_params(10) == 4829258
    assert n_params(create_resnet9_model()) == expected_resnet9_params(2)
    names = dict(model.named_parameters())
    for key in [
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer2.0.bn2.bias",
        "layer3.0.shortcut.0.weight",
        "layer3.0.shortcut.1.weight",
        "linear.weight",
        "linear.bias",
    ]:
        assert key in names
    assert names["linear.weight"].shape == (10, 512)
    buffers = dict(model.named_buffers())
    assert "layer2.0.bn1.running_mean" in buffers
    # Identity shortcut when shapes match: no extra parameters.
    assert n_params(BasicBlock(64, 64)) == 2 * (64 * 64 * 9 + 128)


def test_resnet9_forward_and_backward():
    torch.manual_seed(0)
    model = ResNet9(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10)
    assert model.features(x).shape == (2, 512)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    gray = ResNet9(num_classes=2, in_channels=1).eval()
    assert gray(torch.randn(1, 1, 28, 28)).shape == (1, 2)
    with pytest.raises(ValueError, match="num_classes"):
        ResNet9(num_classes=0)


# --------------------------------------------------------------------------- GPT


def expected_gpt_params(cfg: GPTConfig) -> int:
    n = cfg.n_embd
    per_block = 12 * n * n + 13 * n
    return cfg.vocab_size * n + cfg.block_size * n + cfg.n_layer * per_block + 2 * n


def test_gpt_parameter_count_and_layer_types():
    cfg = GPTConfig()
    model = GPT(cfg)
    assert n_params(model) == expected_gpt_params(cfg) == 10770816
    assert model.num_params() == 10770816 - 256 * 384  # about 10.7M
    assert model.lm_head.weight is model.transformer["wte"].weight
    allowed = (nn.Linear, nn.Embedding, nn.LayerNorm)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)
    assert "transformer.h.5.attn.c_attn.weight" in dict(model.named_parameters())
    untied = GPT(tiny_gpt_config(tie_weights=False))
    assert n_params(untied) == expected_gpt_params(untied.config) + 11 * 16


def test_gpt_forward_loss_and_causality():
    torch.manual_seed(0)
    cfg = tiny_gpt_config()
    model = GPT(cfg).double().eval()
    idx = torch.randint(0, 11, (3, 8))
    targets = torch.randint(0, 11, (3, 8))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 8, 11)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    assert model(idx)[1] is None
    masked = targets.clone()
    masked[:, :4] = -1
    _, partial = model(idx, masked)
    torch.testing.assert_close(
        partial, F.cross_entropy(logits[:, 4:].reshape(-1, 11), targets[:, 4:].reshape(-1))
    )
    # Changing token 5 leaves logits at positions 0..4 unchanged, changes 5..7.
    edited = idx.clone()
    edited[:, 5] = (edited[:, 5] + 1) % 11
    new_logits, _ = model(edited)
    torch.testing.assert_close(new_logits[:, :5], logits[:, :5])
    assert (new_logits[:, 5:] - logits[:, 5:]).abs().amax(dim=-1).min() > 1e-8
    # Shorter sequences and un-batched input.
    short, _ = model(idx[:, :3])
    torch.testing.assert_close(short, logits[:, :3])
    single, single_loss = model(idx[0], targets[0])
    torch.testing.assert_close(single, logits[0])
    torch.testing.assert_close(single_loss, F.cross_entropy(logits[0], targets[0]))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets[:, :4])


def test_gpt_sdpa_matches_explicit_attention():
    torch.manual_seed(0)
    explicit = GPT(tiny_gpt_config()).double().eval()
    fused = GPT(tiny_gpt_config(sdpa=True)).double().eval()
    fused.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, 11, (2, 8))
    torch.testing.assert_close(fused(idx)[0], explicit(idx)[0])


def test_gpt_config_validation_and_generate():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="not both"):
        create_gpt_model(tiny_gpt_config(), n_layer=1)
    model = create_gpt_model(**vars(tiny_gpt_config())).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    out1 = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    out2 = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert out1.shape == (2, 13)
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :3], prompt)
    greedy = model.generate(prompt, 4, top_k=1)
    assert torch.equal(greedy[0], greedy[1])


def test_gpt_per_sample_grads_with_torch_func():
    """vmap(grad(functional_call)) agrees with a loop of autograd.grad."""
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(n_layer=1)).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    idx = torch.randint(0, 11, (3, 6))
    targets = torch.randint(0, 11, (3, 6))

    def loss(p, x, y):
        _, value = torch.func.functional_call(model, p, (x.unsqueeze(0), y.unsqueeze(0)))
        return value

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, idx, targets)
    names = list(params)
    for i in range(3):
        model.zero_grad()
        _, value = model(idx[i : i + 1], targets[i : i + 1])
        grads = torch.autograd.grad(value, [dict(model.named_parameters())[n] for n in names])
        for name, g in zip(names, grads, strict=True):
            torch.testing.assert_close(batched[name][i], g)


def test_supported_models_and_create_model():
    assert SUPPORTED_MODELS == ["lr", "mlp", "resnet9", "resnet18", "musictransformer", "nanogpt"]
    assert isinstance(create_model("lr", dataset="digits"), LogisticRegression)
    assert isinstance(create_model("mlp"), MLPMnist)
    assert isinstance(create_model("resnet9", num_classes=10), ResNet9)
    assert isinstance(create_model("nanogpt", **vars(tiny_gpt_config())), GPT)
    with pytest.raises(ValueError, match="supported"):
        create_model("resnet50")


# ---------------------------------------------------------------------- training


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_train_classifier_reduces_loss_and_is_deterministic():
    train, _ = load_digits_dataset(n_train=300, n_test=10)
    x, y = train.tensors

    def run(seed: int) -> nn.Module:
        torch.manual_seed(123)
        model = MLP(64, hidden=(32,), n_classes=10, dropout=0.2)
        loader = DataLoader(train, batch_size=32, shuffle=True)
        return train_classifier(
            model, loader, epochs=5, lr=0.05, weight_decay=1e-3, seed=seed, verbose=False
        )

    torch.manual_seed(123)
    before = mean_loss(MLP(64, hidden=(32,), n_classes=10, dropout=0.2).eval(), x, y)
    model_a = run(seed=0)
    model_b = run(seed=0)
    model_c = run(seed=1)
    after = mean_loss(model_a, x, y)
    assert not model_a.training
    assert after < 0.3 * before
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    # Another training seed changes shuffling and dropout, hence the result.
    assert any(
        not torch.equal(a, c)
        for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True)
    )


def test_train_classifier_leaves_global_rng_untouched():
    train, _ = load_digits_dataset(n_train=64, n_test=10)
    model = LogisticRegression(64, 10)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    train_classifier(model, DataLoader(train, batch_size=16, shuffle=True), 1, 0.1, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(model, DataLoader(train), 0, 0.1)
    with pytest.raises(ValueError, match="lr"):
        train_classifier(model, DataLoader(train), 1, -1.0)


def test_train_classifier_custom_loss_on_gpt():
    torch.manual_seed(0)
    train, _ = create_char_datasets(block_size=16)
    x, y = train.as_tensors()
    x, y = x[:64], y[:64]
    model = GPT(tiny_gpt_config(vocab_size=train.vocab_size, block_size=16, n_embd=32))

    def lm_loss(m: nn.Module, batch) -> torch.Tensor:
        return m(batch[0], batch[1])[1]

    with torch.no_grad():
        before = float(model(x, y)[1])
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    train_classifier(model, loader, 5, 0.3, momentum=0.9, loss_fn=lm_loss, verbose=False)
    with torch.no_grad():
        after = float(model(x, y)[1])
    assert before > math.log(train.vocab_size) - 0.2
    assert after < before - 0.8


def softmax_objective_numpy(theta, x, y, k, wd):
    """Reference: mean cross-entropy + wd/2 ||theta||^2 and its gradient."""
    d = x.shape[1]
    w = theta[: k * d].reshape(k, d)
    b = theta[k * d :]
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    value = -np.log(p[np.arange(n), y]).mean() + 0.5 * wd * theta @ theta
    p[np.arange(n), y] -= 1
    grad_w = p.T @ x / n
    grad_b = p.mean(axis=0)
    return value, np.concatenate([grad_w.ravel(), grad_b]) + wd * theta


def test_train_full_batch_matches_scipy_minimiser():
    train, _ = load_digits_dataset(n_train=300, n_test=10, dtype=torch.float64)
    x, y = train.tensors
    wd = 1e-2
    torch.manual_seed(0)
    model = LogisticRegression(64, 10).double()
    trained = train_full_batch(model, x, y, weight_decay=wd, tol=1e-9)
    assert trained is model
    assert not model.training

    objective = full_batch_objective(model, x, y, weight_decay=wd)
    grads = torch.autograd.grad(objective, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) <= 1e-9

    theta = torch.cat([model.linear.weight.reshape(-1), model.linear.bias]).detach()
    value, _ = softmax_objective_numpy(theta.numpy(), x.numpy(), y.numpy(), 10, wd)
    assert float(objective.detach()) == pytest.approx(value, rel=1e-12)

    ref = minimize(
        softmax_objective_numpy,
        np.zeros(650),
        args=(x.numpy(), y.numpy(), 10, wd),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 5000},
    )
    np.testing.assert_allclose(theta.numpy(), ref.x, atol=1e-6, rtol=0)


def test_train_full_batch_warns_when_not_converged():
    train, _ = load_digits_dataset(n_train=100, n_test=10, dtype=torch.float64)
    x, y = train.tensors
    model = LogisticRegression(64, 10).double()
    start = float(full_batch_objective(model, x, y, 1e-3).detach())
    with pytest.warns(RuntimeWarning, match="max \\|grad\\|"):
        train_full_batch(model, x, y, weight_decay=1e-3, max_iter=2, tol=1e-12)
    assert float(full_batch_objective(model, x, y, 1e-3).detach()) < start
    with pytest.raises(ValueError, match="max_iter"):
        train_full_batch(model, x, y, max_iter=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_and_trainers_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    resnet = ResNet9(num_classes=10).to(device)
    assert resnet(torch.randn(4, 3, 32, 32, device=device)).shape == (4, 10)

    gpt_cpu = GPT(tiny_gpt_config()).double().eval()
    gpt_gpu = GPT(tiny_gpt_config(sdpa=True)).double().eval().to(device)
    gpt_gpu.load_state_dict(gpt_cpu.state_dict())
    idx = torch.randint(0, 11, (2, 8))
    torch.testing.assert_close(gpt_gpu(idx.to(device))[0].cpu(), gpt_cpu(idx)[0])

    train, _ = load_digits_dataset(n_train=200, n_test=10)
    model = MLP(64, hidden=(32,), n_classes=10)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    before = mean_loss(model, *train.tensors)
    train_classifier(model, loader, 3, 0.05, device=device, verbose=False)
    assert next(model.parameters()).device.type == "cuda"
    after = mean_loss(model.cpu(), *train.tensors)
    assert after < before

    x, y = load_digits_dataset(n_train=200, n_test=10, dtype=torch.float64)[0].tensors
    lr = LogisticRegression(64, 10).double().to(device)
    train_full_batch(lr, x, y, weight_decay=1e-2, tol=1e-8)
    objective = full_batch_objective(lr, x.to(device), y.to(device), 1e-2)
    grads = torch.autograd.grad(objective, list(lr.parameters()))
    assert max(float(g.abs().max()) for g in grads) <= 1e-8
