"""KNN-Shapley: exact Shapley values by permutation enumeration, loop reference, API."""

import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.data_shapley import (
    KNNShapleyAttributor,
    default_dist_func,
    knn_shapley_values,
)


def _knn_utility(subset, dist_row, y_train, y_test, k):
    """Jia et al. utility: fraction of the K nearest (ties: lower index first) matching."""
    if not subset:
        return 0.0
    ranked = sorted(subset, key=lambda i: (dist_row[i], i))[:k]
    return sum(float(y_train[i] == y_test) for i in ranked) / k


def _exact_shapley(dist_row, y_train, y_test, k):
    """Shapley values by averaging marginal contributions over all permutations."""
    n = len(y_train)
    cache = {}

    def u(s):
        key = frozenset(s)
        if key not in cache:
            cache[key] = _knn_utility(list(key), dist_row, y_train, y_test, k)
        return cache[key]

    phi = [0.0] * n
    for perm in itertools.permutations(range(n)):
        before = []
        for i in perm:
            phi[i] += u([*before, i]) - u(before)
            before.append(i)
    return [v / math.factorial(n) for v in phi]


def _loop_recursion(dist_row, y_train, y_test, k):
    """Straightforward Python loop of the Jia et al. recursion."""
    n = len(y_train)
    order = sorted(range(n), key=lambda i: (dist_row[i], i))
    m = [float(y_train[j] == y_test) for j in order]
    s = [0.0] * n
    s[n - 1] = m[n - 1] * min(k, n) / (n * k)  # = m/N for K <= N (paper); m/K for K > N
    for i in range(n - 2, -1, -1):  # 0-based position i is 1-based i + 1
        s[i] = s[i + 1] + (m[i] - m[i + 1]) / k * min(k, i + 1) / (i + 1)
    out = [0.0] * n
    for pos, j in enumerate(order):
        out[j] = s[pos]
    return out


def _tie_problem():
    # integer features on a small grid -> many exact distance ties
    g = torch.Generator().manual_seed(0)
    x_train = torch.randint(0, 3, (7, 2), generator=g).double()
    y_train = torch.tensor([0, 1, 0, 2, 1, 0, 1])
    x_test = torch.randint(0, 3, (5, 2), generator=g).double()
    y_test = torch.tensor([0, 1, 2, 0, 1])
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_equals_permutation_shapley_with_ties(k):
    x_train, y_train, x_test, y_test = _tie_problem()
    dist = torch.cdist(x_test, x_train)
    assert len(torch.unique(dist)) < dist.numel()  # the problem does have ties
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=3)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=2)
    attr = KNNShapleyAttributor(k_neighbors=k, verbose=False)
    attr.cache()
    values = attr.attribute(train, test)
    assert values.shape == (5, 7)
    assert values.dtype == torch.float64
    for j in range(5):
        exact = _exact_shapley(dist[j].tolist(), y_train.tolist(), int(y_test[j]), k)
        loop = _loop_recursion(dist[j].tolist(), y_train.tolist(), int(y_test[j]), k)
        torch.testing.assert_close(values[j], torch.tensor(exact, dtype=torch.float64))
        torch.testing.assert_close(values[j], torch.tensor(loop, dtype=torch.float64))
        # efficiency: values sum to U(full set) - U(empty set)
        u_full = _knn_utility(list(range(7)), dist[j].tolist(), y_train.tolist(), int(y_test[j]), k)
        assert values[j].sum().item() == pytest.approx(u_full, abs=1e-12)


def test_vectorised_equals_loop_on_larger_random_problem():
    g = torch.Generator().manual_seed(1)
    x_train = torch.randn(200, 5, generator=g)
    y_train = torch.randint(0, 4, (200,), generator=g)
    x_test = torch.randn(30, 5, generator=g)
    y_test = torch.randint(0, 4, (30,), generator=g)
    attr = KNNShapleyAttributor(k_neighbors=5, verbose=False)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=7)
    values = attr.attribute(train, test)
    assert values.dtype == torch.float32
    dist = torch.cdist(x_test.double(), x_train.double())
    for j in range(30):
        loop = _loop_recursion(dist[j].tolist(), y_train.tolist(), int(y_test[j]), 5)
        torch.testing.assert_close(values[j], torch.tensor(loop, dtype=torch.float32))
    tt = attr.attribute_train_test(train, test)
    assert torch.equal(tt, values.T)
    topk = attr.attribute_topk(train, test, k=3)
    assert torch.equal(topk.helpful_indices, torch.topk(values, 3, dim=1).indices)


def test_self_attribute_is_diagonal_and_function_api():
    x_train, y_train, _, _ = _tie_problem()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=2)
    attr = KNNShapleyAttributor(k_neighbors=2, verbose=False)
    full = attr.attribute_train_test(train, train)
    torch.testing.assert_close(attr.self_attribute(train), full.diagonal())
    dist = default_dist_func((x_train,), (x_train,))
    match = y_train.unsqueeze(1) == y_train.unsqueeze(0)
    torch.testing.assert_close(knn_shapley_values(dist, match, 2), full.T)


def test_dict_batches_explicit_labels_and_custom_distance():
    x_train, y_train, x_test, y_test = _tie_problem()

    class DictDS(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"feat": self.x[i], "target": self.y[i]}

    ref = KNNShapleyAttributor(2, verbose=False).attribute(
        DataLoader(TensorDataset(x_train, y_train), batch_size=4),
        DataLoader(TensorDataset(x_test, y_test), batch_size=4),
    )
    attr = KNNShapleyAttributor(2, label_key="target", verbose=False)
    got = attr.attribute(
        DataLoader(DictDS(x_train, y_train), batch_size=3),
        DataLoader(DictDS(x_test, y_test), batch_size=3),
    )
    torch.testing.assert_close(got, ref)
    # explicit labels with label-free tensor batches and a custom (L1) distance
    l1 = KNNShapleyAttributor(
        2, distance_func=lambda a, b: torch.cdist(a, b, p=1), verbose=False
    ).attribute(
        DataLoader(x_train, batch_size=3),
        DataLoader(x_test, batch_size=3),
        train_labels=y_train.tolist(),
        test_labels=y_test,
    )
    dist = torch.cdist(x_test, x_train, p=1)
    for j in range(5):
        loop = _loop_recursion(dist[j].tolist(), y_train.tolist(), int(y_test[j]), 2)
        torch.testing.assert_close(l1[j], torch.tensor(loop, dtype=torch.float64))


def test_errors():
    x_train, y_train, x_test, y_test = _tie_problem()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=4)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=4)
    with pytest.raises(ValueError, match="k_neighbors"):
        KNNShapleyAttributor(0)
    with pytest.raises(NotImplementedError, match="task"):
        KNNShapleyAttributor(2, task=object())
    attr = KNNShapleyAttributor(2, verbose=False)
    with pytest.raises(ValueError, match="train_labels has 3 entries"):
        attr.attribute(train, test, train_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="cannot read labels"):
        attr.attribute(DataLoader(x_train, batch_size=4), test)
    with pytest.raises(ValueError, match="no label entry"):
        attr.attribute(DataLoader([{"x": x} for x in x_train], batch_size=4), test)
    bad = KNNShapleyAttributor(2, distance_func=lambda a, b: torch.zeros(1, 1), verbose=False)
    with pytest.raises(ValueError, match="distance_func returned shape"):
        bad.attribute(train, test)
    with pytest.warns(UserWarning, match="shuffles"):
        attr.attribute(DataLoader(TensorDataset(x_train, y_train), shuffle=True), test)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    x_train, y_train = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
    x_test, y_test = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    train = DataLoader(TensorDataset(x_train.double(), y_train), batch_size=64)
    test = DataLoader(TensorDataset(x_test.double(), y_test), batch_size=16)
    cpu = KNNShapleyAttributor(4, verbose=False).attribute(train, test)
    gpu = KNNShapleyAttributor(4, device="cuda", verbose=False).attribute(train, test)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
