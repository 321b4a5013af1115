"""CUDA paths of dattri.metric / dattri.model_util (run on the lent GPU machine only)."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.metric import lds, loo_corr, mislabel_detection_auc
from dattri.model_util import (
    SubsetTrainConfig,
    get_final_layer_io,
    retrain_lds,
    train_subset_models,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:80] / 16.0, dtype=torch.float32), torch.tensor(y[:80])


def _mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_metrics_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(20, 4, generator=g)
    idx = torch.stack([torch.randperm(20, generator=g)[:10] for _ in range(8)])
    gt = torch.randn(8, 4, generator=g)
    c_cpu, p_cpu = lds(score, (gt, idx))
    c_gpu, p_gpu = lds(score.cuda(), (gt.cuda(), idx.cuda()))
    assert (
        c_gpu.is_cuda and torch.allclose(c_gpu.cpu(), c_cpu) and torch.allclose(p_gpu.cpu(), p_cpu)
    )
    loo = torch.randn(20, 4, generator=g)
    assert torch.allclose(
        loo_corr(score.cuda(), (loo.cuda(), None))[0].cpu(), loo_corr(score, (loo, None))[0]
    )
    labels = (torch.rand(20, generator=g) < 0.3).long()
    labels[0], labels[1] = 0, 1
    a_gpu, (fpr, _, _) = mislabel_detection_auc(score[:, 0].cuda(), labels.cuda())
    assert a_gpu.is_cuda and fpr.is_cuda
    assert a_gpu.item() == mislabel_detection_auc(score[:, 0], labels)[0].item()


def test_train_subset_models_cuda_vectorized_equals_sequential_and_cpu():
    x, y = _digits()
    masks = torch.rand(6, 80, generator=torch.Generator().manual_seed(1)) < 0.5
    cfg = SubsetTrainConfig(epochs=5, lr=0.1, batch_size=16, device="cuda")
    vec = train_subset_models(_mlp, (x, y), masks, cfg, verbose=False)
    seq = train_subset_models(_mlp, (x, y), masks, cfg, vectorized=False, verbose=False)
    cpu = train_subset_models(
        _mlp, (x, y), masks, SubsetTrainConfig(**{**cfg.__dict__, "device": "cpu"}), verbose=False
    )
    for a, b, c in zip(vec, seq, cpu, strict=True):
        for k in a:
            assert a[k].device.type == "cpu"  # returned on CPU
            assert torch.allclose(a[k], b[k], atol=1e-4), k
            assert torch.allclose(a[k], c[k], atol=1e-3), k


def test_retrain_lds_with_cuda_train_func_saves_cpu_state_dicts(tmp_path):
    x, y = _digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def train_func(ld, seed=0):
        torch.manual_seed(seed)
        model = nn.Linear(64, 10).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for xb, yb in ld:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb.cuda()), yb.cuda()).backward()
            opt.step()
        return model

    retrain_lds(train_func, loader, tmp_path, num_subsets=2, seed=0, verbose=False)
    sd = torch.load(tmp_path / "1" / "model_weights_0.pt", weights_only=True)
    assert sd["weight"].device.type == "cpu"


def test_get_final_layer_io_cuda():
    model = _mlp().cuda().eval()
    x = torch.randn(9, 64)
    inputs, outputs = get_final_layer_io(
        model, "2", DataLoader(TensorDataset(x, x[:, 0]), batch_size=4), device="cuda"
    )
    assert inputs.is_cuda and outputs.shape == (9, 10)
    with torch.no_grad():
        assert torch.allclose(outputs, model(x.cuda()), atol=1e-5)
