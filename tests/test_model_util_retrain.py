"""retrain_lds / retrain_loo: layout, metadata, sampler indices, resume, distributed jobs."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler, SubsetRandomSampler, TensorDataset

from dattri.metric import calculate_lds_ground_truth, calculate_loo_ground_truth
from dattri.model_util import retrain_lds, retrain_loo

N_DATA = 30


class FixedOrderSampler(Sampler):
    """Deterministic sampler over given dataset indices, without an ``indices`` attribute."""

    def __init__(self, order):
        self._order = list(order)

    def __iter__(self):
        return iter(self._order)

    def __len__(self):
        return len(self._order)


class Recorder:
    """Fake training: the 'model' encodes which dataset indices and seed it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, loader, seed=None, scale=1.0):
        seen = sorted(int(i) for batch in loader for i in batch[2])
        self.calls.append((seen, seed))
        model = nn.Linear(N_DATA, 1)
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, seen] = scale  # one-hot of the training set
            model.bias.fill_(float(seed % 1000) if seed is not None else -1.0)
        return model


def _dataset():
    x = torch.randn(N_DATA, 2, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.zeros(N_DATA), torch.arange(N_DATA))


def _seen_from_ckpt(path):
    sd = torch.load(path, weights_only=True)
    return sorted(torch.nonzero(sd["weight"][0]).flatten().tolist()), sd["bias"].item()


def test_retrain_lds_layout_metadata_and_sampler_indices(tmp_path):
    order = list(range(5, 25))  # 20 training samples = dataset indices 5..24
    loader = DataLoader(_dataset(), batch_size=4, sampler=FixedOrderSampler(order))
    rec = Recorder()
    retrain_lds(
        rec,
        loader,
        tmp_path,
        num_subsets=3,
        subset_ratio=0.5,
        num_runs_per_subset=2,
        seed=7,
        verbose=False,
        scale=2.0,
    )
    meta = yaml.safe_load((tmp_path / "metadata.yml").read_text())
    assert meta["mode"] == "lds" and meta["data_length"] == 20 and meta["num_subsets"] == 3
    assert meta["num_runs_per_subset"] == 2 and meta["subset_ratio"] == 0.5
    assert meta["subset_dir_map"] == {0: "0", 1: "1", 2: "2"}  # relative to tmp_path
    assert meta["train_func"] and meta["seed"] == 7
    assert len(rec.calls) == 6
    for i in range(3):
        pos = [int(t) for t in (tmp_path / str(i) / "indices.txt").read_text().split()]
        expected = np.random.default_rng(7 + i).choice(20, 10, replace=False).tolist()
        assert pos == expected
        ds = [int(t) for t in (tmp_path / str(i) / "dataset_indices.txt").read_text().split()]
        assert ds == [order[p] for p in pos]
        for j in range(2):
            seen, bias = _seen_from_ckpt(tmp_path / str(i) / f"model_weights_{j}.pt")
            assert seen == sorted(ds)  # trained on the sampler's actual dataset indices
            assert bias == 7 + i * 2 + j  # run seed
    # kwargs were forwarded
    sd = torch.load(tmp_path / "0" / "model_weights_0.pt", weights_only=True)
    assert sd["weight"].max().item() == 2.0


def test_retrain_lds_resume_and_relocation(tmp_path):
    loader = DataLoader(_dataset(), batch_size=8)
    rec = Recorder()
    run_dir = tmp_path / "run"
    retrain_lds(rec, loader, run_dir, num_subsets=4, subset_ratio=0.3, seed=0, verbose=False)
    assert len(rec.calls) == 4
    (run_dir / "2" / "model_weights_0.pt").unlink()
    (run_dir / "3" / ".model_weights_0.pt.123.tmp").write_bytes(b"partial")  # stale temp
    rec2 = Recorder()
    retrain_lds(rec2, loader, run_dir, num_subsets=4, subset_ratio=0.3, seed=0, verbose=False)
    assert len(rec2.calls) == 1 and rec2.calls[0][1] == 2
    rec3 = Recorder()
    retrain_lds(rec3, loader, run_dir, num_subsets=4, subset_ratio=0.3, seed=0, verbose=False)
    assert rec3.calls == []
    # a different seed in the same directory is refused
    with pytest.raises(ValueError, match="seed"):
        retrain_lds(rec3, loader, run_dir, num_subsets=4, subset_ratio=0.3, seed=1, verbose=False)
    with pytest.raises(ValueError, match="different retraining"):
        retrain_lds(rec3, loader, run_dir, num_subsets=4, subset_ratio=0.5, seed=0, verbose=False)

    # ground truth reads the directory after it moved (paths are relative)
    moved = tmp_path / "moved"
    shutil.move(run_dir, moved)

    def target(ckpt, test_loader):
        sd = torch.load(ckpt, weights_only=True)
        return sd["weight"][0, :3] + sd["bias"]  # 3 "test samples"

    values, indices = calculate_lds_ground_truth(target, moved, None)
    assert values.shape == (4, 3) and indices.shape == (4, 9) and indices.dtype == torch.int64
    for i in range(4):
        expected = -(torch.isin(torch.arange(3), indices[i]).float() + i)  # negated
        assert torch.equal(values[i], expected)


def test_retrain_lds_runs_average_and_seed_none(tmp_path):
    loader = DataLoader(_dataset(), batch_size=8)
    retrain_lds(
        Recorder(),
        loader,
        tmp_path,
        num_subsets=2,
        subset_ratio=0.5,
        num_runs_per_subset=3,
        verbose=False,
    )
    meta = yaml.safe_load((tmp_path / "metadata.yml").read_text())
    assert meta["seed"] is None

    def target(ckpt, _):
        return torch.load(ckpt, weights_only=True)["bias"].reshape(1)

    values, _ = calculate_lds_ground_truth(target, tmp_path, None)
    biases = [
        [torch.load(tmp_path / str(i) / f"model_weights_{j}.pt")["bias"].item() for j in range(3)]
        for i in range(2)
    ]
    assert torch.allclose(values[:, 0], -torch.tensor(biases).mean(1))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_retrain_lds_distributed_jobs_write_metadata_when_all_done(tmp_path, order):
    loader = DataLoader(_dataset(), batch_size=8)
    for job in order:
        assert not (tmp_path / "metadata.yml").exists()
        retrain_lds(
            Recorder(),
            loader,
            tmp_path,
            num_subsets=2,
            start_id=2 * job,
            total_num_subsets=4,
            seed=3,
            verbose=False,
        )
    meta = yaml.safe_load((tmp_path / "metadata.yml").read_text())
    assert meta["num_subsets"] == 4 and sorted(meta["subset_dir_map"]) == [0, 1, 2, 3]
    for i in range(4):  # subset ids are global: same as a single 4-subset run
        pos = [int(t) for t in (tmp_path / str(i) / "indices.txt").read_text().split()]
        assert pos == np.random.default_rng(3 + i).choice(N_DATA, 15, replace=False).tolist()


def test_retrain_lds_argument_errors(tmp_path):
    loader = DataLoader(_dataset(), batch_size=8)
    with pytest.raises(ValueError, match="total_num_subsets"):
        retrain_lds(Recorder(), loader, tmp_path, num_subsets=3, total_num_subsets=4)
    with pytest.raises(ValueError, match="total_num_subsets"):
        retrain_lds(Recorder(), loader, tmp_path, num_subsets=3, total_num_subsets=-3)
    with pytest.raises(ValueError, match="subset_ratio"):
        retrain_lds(Recorder(), loader, tmp_path, subset_ratio=0.0)
    with pytest.raises(ValueError, match="num_subsets"):
        retrain_lds(Recorder(), loader, tmp_path, num_subsets=0)
    with pytest.raises(ValueError, match="exceed"):
        retrain_lds(Recorder(), loader, tmp_path, num_subsets=2, start_id=4, total_num_subsets=4)
    with pytest.raises(TypeError, match="state_dict"):
        retrain_lds(lambda loader, seed: 3, loader, tmp_path, num_subsets=1, verbose=False)
    with pytest.raises(FileNotFoundError, match="metadata"):
        calculate_lds_ground_truth(lambda c, t: torch.zeros(1), tmp_path / "none", None)


def test_retrain_loo_layout_resume_and_ground_truth(tmp_path):
    sampler = SubsetRandomSampler(list(range(10, 20)))  # has .indices; dataset idx 10..19
    loader = DataLoader(_dataset(), batch_size=3, sampler=sampler)
    rec = Recorder()
    retrain_loo(rec, loader, tmp_path, indices=[0, 3, 5], seed=11, verbose=False)
    assert len(rec.calls) == 3 and all(seed == 11 for _, seed in rec.calls)
    meta = yaml.safe_load((tmp_path / "metadata.yml").read_text())
    assert meta["mode"] == "loo" and meta["data_length"] == 10 and meta["indices"] == [0, 3, 5]
    assert meta["dataset_indices"] == [10, 13, 15]
    assert meta["map_index_dir"] == {0: "index_0", 3: "index_3", 5: "index_5"}
    for p in (0, 3, 5):
        seen, _ = _seen_from_ckpt(tmp_path / f"index_{p}" / "model_weights.pt")
        assert seen == [d for d in range(10, 20) if d != 10 + p]

    rec2 = Recorder()  # resume + extend: only position 7 is new
    retrain_loo(rec2, loader, tmp_path, indices=[3, 7], seed=11, verbose=False)
    assert len(rec2.calls) == 1
    meta = yaml.safe_load((tmp_path / "metadata.yml").read_text())
    assert meta["indices"] == [0, 3, 5, 7]

    def target(ckpt, _):  # "test sample" j: was dataset index 10 + j in training?
        return torch.load(ckpt, weights_only=True)["weight"][0, 10:20]

    values, removed = calculate_loo_ground_truth(target, tmp_path, None)
    assert removed.tolist() == [0, 3, 5, 7] and values.shape == (4, 10)
    for row, p in zip(values, removed.tolist(), strict=True):
        assert row[p] == 0 and row.sum() == 9

    with pytest.raises(ValueError, match="indices"):
        retrain_loo(rec, loader, tmp_path, indices=[10])
    with pytest.raises(ValueError, match="different retraining"):
        retrain_loo(rec, DataLoader(_dataset()), tmp_path, indices=[1], verbose=False)


def test_calculate_loo_ground_truth_legacy_layout_without_metadata(tmp_path):
    for k in (10, 2):
        (tmp_path / f"index_{k}").mkdir()
        torch.save({"w": torch.tensor([float(k)])}, tmp_path / f"index_{k}" / "model_weights.pt")
    values, removed = calculate_loo_ground_truth(
        lambda c, _: torch.load(c, weights_only=True)["w"], tmp_path, None
    )
    assert removed.tolist() == [2, 10]  # numeric, not lexicographic, order
    assert values[:, 0].tolist() == [2.0, 10.0]
