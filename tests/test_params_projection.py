"""Tests for dattri.params.projection."""

from __future__ import annotations

import warnings

import pytest
import torch

from dattri.func.projection import ProjectionType
from dattri.params.projection import (
    BaseProjectionParams,
    DVEmbProjectionParams,
    FactGraSSProjectionParams,
    FactGrassProjectionParams,
    GeneralProjectionParams,
    LoGraProjectionParams,
    RandomProjectionParams,
    TracInProjectionParams,
    TRAKProjectionParams,
)


def test_defaults():
    assert BaseProjectionParams().model_dump() == {
        "proj_max_batch_size": 64,
        "proj_seed": 0,
        "proj_type": "normal",
    }
    tracin = TracInProjectionParams()
    assert (tracin.proj_dim, tracin.proj_max_batch_size) == (512, 32)
    trak = TRAKProjectionParams()
    assert (trak.proj_dim, trak.proj_max_batch_size, trak.proj_type) == (512, 32, "normal")
    assert isinstance(trak, GeneralProjectionParams)
    dvemb = DVEmbProjectionParams()
    assert dvemb.proj_dim_per_layer is None
    assert dvemb.proj_max_batch_size == 64
    assert dvemb.proj_type == "identity"
    assert LoGraProjectionParams().proj_dim_per_layer == 4096
    assert FactGrassProjectionParams().proj_dim_per_layer == 4096
    assert FactGraSSProjectionParams is FactGrassProjectionParams


def test_required_fields():
    with pytest.raises(TypeError, match="proj_dim"):
        GeneralProjectionParams()
    with pytest.raises(TypeError, match="feature_batch_size"):
        RandomProjectionParams(proj_dim=4, proj_max_batch_size=2, proj_seed=0, device="cpu")
    with pytest.raises(TypeError, match="proj_max_batch_size"):
        RandomProjectionParams(proj_dim=4, proj_seed=0, feature_batch_size=2, device="cpu")
    with pytest.raises(TypeError, match="keyword"):
        GeneralProjectionParams(4)


def test_random_params_from_model_dump_and_device():
    base = TRAKProjectionParams(proj_dim=128, proj_type="sjlt", proj_seed=3)
    params = RandomProjectionParams(feature_batch_size=8, device="cpu", **base.model_dump())
    assert params.device == torch.device("cpu")
    assert isinstance(params.device, torch.device)
    assert params.model_dump() == {
        "proj_max_batch_size": 32,
        "proj_seed": 3,
        "proj_type": "sjlt",
        "proj_dim": 128,
        "feature_batch_size": 8,
        "device": torch.device("cpu"),
    }
    params = RandomProjectionParams(
        proj_dim=4,
        proj_max_batch_size=2,
        proj_seed=0,
        feature_batch_size=1,
        device=torch.device("cpu"),
    )
    assert params.proj_type == "normal"
    assert params.model_dump(include=["proj_dim", "device"]) == {
        "proj_dim": 4,
        "device": torch.device("cpu"),
    }
    assert "device" not in params.model_dump(exclude={"device"})


def test_proj_type_values():
    for name in ("identity", "normal", "rademacher", "sjlt", "random_mask", "grass"):
        assert BaseProjectionParams(proj_type=name).proj_type == name
    assert BaseProjectionParams(proj_type="grass_8").proj_type == "grass_8"
    value = BaseProjectionParams(proj_type=ProjectionType.sjlt).proj_type
    assert value == "sjlt"
    assert type(value) is str
    for bad in ("gaussian", "grass_0", "grass_", "grass_x", "Normal"):
        with pytest.raises(ValueError, match="proj_type"):
            BaseProjectionParams(proj_type=bad)
    with pytest.raises(TypeError, match="proj_type"):
        BaseProjectionParams(proj_type=1)


def test_value_validation():
    with pytest.raises(ValueError, match="proj_dim"):
        GeneralProjectionParams(proj_dim=0)
    with pytest.raises(TypeError, match="proj_dim"):
        GeneralProjectionParams(proj_dim=1.5)
    with pytest.raises(TypeError, match="proj_max_batch_size"):
        BaseProjectionParams(proj_max_batch_size=True)
    with pytest.raises(ValueError, match="proj_max_batch_size"):
        BaseProjectionParams(proj_max_batch_size=0)
    with pytest.raises(TypeError, match="proj_seed"):
        BaseProjectionParams(proj_seed="1")
    assert BaseProjectionParams(proj_seed=-3).proj_seed == -3
    with pytest.raises(ValueError, match="proj_dim_per_layer"):
        LoGraProjectionParams(proj_dim_per_layer=-1)
    assert DVEmbProjectionParams(proj_dim_per_layer=16).proj_dim_per_layer == 16
    with pytest.raises(ValueError, match="device"):
        RandomProjectionParams(
            proj_dim=4, proj_max_batch_size=2, proj_seed=0, feature_batch_size=1, device="gpu7"
        )
    with pytest.raises(TypeError, match="device"):
        RandomProjectionParams(
            proj_dim=4, proj_max_batch_size=2, proj_seed=0, feature_batch_size=1, device=0.5
        )


def test_unknown_kwargs_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="proj_dim_per_layer"):
        params = RandomProjectionParams(
            proj_dim=4,
            proj_max_batch_size=2,
            proj_seed=0,
            feature_batch_size=1,
            device="cpu",
            proj_dim_per_layer=8,
        )
    assert not hasattr(params, "proj_dim_per_layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TracInProjectionParams(proj_dim=64)  # known kwargs: no warning
