"""The peer workers of benchmarks/bench_generative_peers.py see our benchmark model.

The peers (Kronfluence, upstream dattri) cannot import our package, so their workers
rebuild the corpus-nanogpt model from our ``gpt.py`` loaded by path plus the exported
config. These tests check that the rebuilt model is the same function as ours (same
state dict keys, same logits, same per-sequence loss) and the exported spec.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from dattri.benchmark.corpus_lm import CORPUS_BLOCK, corpus_blocks, create_corpus_lm, sequence_loss

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generative_peers.py"
_spec = importlib.util.spec_from_file_location("bench_generative_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules["bench_generative_peers"] = peers
_spec.loader.exec_module(peers)


class _Prepared:
    """The parts of a PreparedSetting that ``_spec`` reads."""

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self._model = model
        self.path = path

    def model(self, name: str = "full") -> torch.nn.Module:
        return self._model

    def checkpoint_paths(self, prefix: str) -> list[str]:
        return [str(self.path / "models" / f"{prefix}_0.pt")]


def test_rebuilt_model_is_ours(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = create_corpus_lm(n_layer=1, n_head=2, n_embd=8).eval()
    spec = json.loads(json.dumps(peers._spec(_Prepared(ours, tmp_path), "corpus-nanogpt", True)))
    assert spec["config"]["block_size"] == CORPUS_BLOCK
    assert Path(spec["model_file"]).is_file()
    n_params = sum(p.numel() for p in ours.parameters())
    assert spec["trak_proj_dim"] == min(512, n_params)

    rebuilt = peers._build_char_lm(spec)
    rebuilt.load_state_dict(ours.state_dict())  # strict: same parameter names and shapes
    rebuilt.eval()
    assert not any(isinstance(m, torch.nn.Dropout) for m in rebuilt.modules())
    x, y, _, _ = corpus_blocks(n_test=4, n_train=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x), rtol=0, atol=0)
        torch.testing.assert_close(
            peers._seq_loss(rebuilt(x), y), sequence_loss(ours(x), y), rtol=1e-6, atol=1e-6
        )


def test_corr_detects_sign() -> None:
    a = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    assert abs(peers._corr(a, 3 * a + 1) - 1) < 1e-12
    assert abs(peers._corr(a, -a) + 1) < 1e-12
