"""activate_dropout and get_final_layer_io."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.model_util import activate_dropout, get_final_layer_io


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5))
        self.drop_a = nn.Dropout(0.3)
        self.head = nn.Module()
        self.head.fc = nn.Linear(6, 3)
        self.head.drop_b = nn.Dropout2d(0.2)

    def forward(self, x):
        return self.head.fc(self.drop_a(self.body(x)))


def test_activate_dropout_all_and_selected():
    # Seeded init: with an unlucky init every ReLU unit can be 0 on the ones input,
    # and dropout of zeros is deterministic (the flake this seed removes).
    torch.manual_seed(3)
    model = Net().train()
    out = activate_dropout(model, dropout_prob=0.25)
    assert out is model
    drops = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    assert set(drops) == {"body.2", "drop_a", "head.drop_b"}
    assert all(m.training and m.p == 0.25 for m in drops.values())
    assert not model.training and not model.body[0].training and not model.head.fc.training
    # stochastic in forward passes now, while the rest is in eval mode
    x = torch.ones(2, 4)
    assert (model.body[1](model.body[0](x)) > 0).any()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))

    model = Net().train()
    activate_dropout(model, layer_positions=["drop_a", "drop_b"], dropout_prob=0.1)
    assert model.drop_a.training and model.drop_a.p == 0.1
    assert model.head.drop_b.training and model.head.drop_b.p == 0.1
    assert not model.body[2].training and model.body[2].p == 0.5
    activate_dropout(model, layer_positions="body.2")  # single string accepted
    assert model.body[2].training and not model.drop_a.training


def test_activate_dropout_errors():
    with pytest.raises(ValueError, match="not a dropout"):
        activate_dropout(Net(), layer_positions=["head"])  # matches head and head.fc
    with pytest.raises(ValueError, match="match no module"):
        activate_dropout(Net(), layer_positions=["nope"])
    with pytest.raises(ValueError, match="dropout_prob"):
        activate_dropout(Net(), dropout_prob=1.0)


def test_get_final_layer_io_nested_layer_tuple_and_dict_batches():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(7, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(7)), batch_size=3)
    inputs, outputs = get_final_layer_io(model, "head.fc", loader)
    with torch.no_grad():
        feats = model.body(x)
        expected_out = model.head.fc(feats)
    assert inputs.shape == (7, 6) and outputs.shape == (7, 3)
    assert torch.allclose(inputs, feats) and torch.allclose(outputs, expected_out)
    assert not inputs.requires_grad
    assert not model.head.fc._forward_hooks  # hook removed

    class DictNet(Net):
        def forward(self, pixel, label=None):
            return super().forward(pixel)

    dmodel = DictNet().eval()
    dloader = [{"pixel": x[:4], "label": torch.zeros(4)}, {"pixel": x[4:], "label": torch.zeros(3)}]
    d_in, d_out = get_final_layer_io(dmodel, "head.fc", dloader)
    with torch.no_grad():
        assert torch.allclose(d_out, dmodel(x))
    assert d_in.shape == (7, 6)


def test_get_final_layer_io_errors():
    model = Net()
    with pytest.raises(ValueError, match="not a module"):
        get_final_layer_io(model, "head.fc2", [(torch.zeros(1, 4),)])
    with pytest.raises(ValueError, match="never called"):
        get_final_layer_io(model, "head.drop_b", [(torch.zeros(1, 4),)])
