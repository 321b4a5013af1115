"""A Hugging Face ``transformers`` model with dict batches: a tiny GPT-2, built offline.

The model is a randomly initialised ``GPT2LMHeadModel`` from a small ``GPT2Config`` (no
download). The data is a synthetic language: each sequence repeats the 4-token motif of
one of a few "topics", with 10% of the tokens replaced by noise. Batches are dicts
``{"input_ids", "labels"}``, the way Hugging Face models take them.

The three loss conventions of dattri, all on the same model:

* TracIn / Grad-Dot (functional loss, un-batched sample): ``loss(params, sample)`` where
  ``sample = {"input_ids": (T,), "labels": (T,)}``; add the batch axis yourself.
* Influence functions (DataInf here; functional loss, sample seen as ``(1, T)``):
  ``loss(params, batch)``; the same function is called on whole batches for curvature.
* LoGra (eager loss on a batch): ``loss(model, batch, device)`` returning the mean loss.

A good attribution puts training sequences of the test sequence's topic at the top: the
script prints the fraction of the top-5 proponents that share it (chance = 1 / topics).

    pip install transformers                      # needed; the script exits cleanly without it
    python examples/hf_gpt2_dict_batches.py       # ~30 s on 2 CPU cores
    python examples/hf_gpt2_dict_batches.py --quick
"""

from __future__ import annotations

import sys

import torch
from _common import device_from, parser
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from dattri.algorithm import IFAttributorDataInf, LoGraAttributor, TracInAttributor
from dattri.params.projection import LoGraProjectionParams, TracInProjectionParams
from dattri.task import AttributionTask

VOCAB, SEQ_LEN, MOTIF = 32, 16, 4


class DictDataset(Dataset):
    """Yields ``{"input_ids": (T,), "labels": (T,)}``; the default collate stacks them."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_corpus(
    n: int, topics: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(n, SEQ_LEN)`` and their topic ids ``(n,)``."""
    topic = torch.arange(n) % len(topics)
    seq = topics[topic].repeat(1, SEQ_LEN // MOTIF)
    noise = torch.rand(seq.shape, generator=gen) < 0.1
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=gen), seq)
    return seq, topic


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    device = device_from(args.device)
    try:
        import transformers
    except ImportError:
        print(
            "SKIPPED: this example needs Hugging Face transformers, which is not installed. "
            "Install it with `pip install transformers` (no model download is needed)."
        )
        sys.exit(0)
    transformers.logging.set_verbosity_error()
    n_topics, n_train, n_test, steps = (4, 32, 4, 60) if args.quick else (6, 120, 24, 300)

    gen = torch.Generator().manual_seed(args.seed)
    topics = torch.randint(0, VOCAB, (n_topics, MOTIF), generator=gen)
    train_ids, train_topic = make_corpus(n_train, topics, gen)
    test_ids, test_topic = make_corpus(n_test, topics, gen)
    train = DataLoader(DictDataset(train_ids), batch_size=16)
    test = DataLoader(DictDataset(test_ids), batch_size=16)

    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    shuffled = DataLoader(
        DictDataset(train_ids), batch_size=16, shuffle=True, generator=gen, drop_last=True
    )
    model.train()
    step = 0
    while step < steps:
        for batch in shuffled:
            batch = {k: v.to(device) for k, v in batch.items()}
            opt.zero_grad()
            loss = model(**batch).loss  # Hugging Face shifts the labels itself
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    print(
        f"GPT-2 with {sum(p.numel() for p in model.parameters())} parameters, "
        f"final training loss {loss.item():.3f}"
    )
    ckpt = model.state_dict()

    # 1. TracIn / Grad-Dot: the loss sees ONE un-batched sample; add the batch axis.
    def loss_unbatched(params: dict, sample: dict) -> torch.Tensor:
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        return functional_call(model, params, args=(), kwargs=batch).loss

    # 2. Influence functions: the sample keeps a batch axis of one, (1, T); whole
    #    batches (B, T) go through the same function for the curvature.
    def loss_batched(params: dict, batch: dict) -> torch.Tensor:
        return functional_call(model, params, args=(), kwargs=batch).loss

    # 3. LoGra: an eager loss of (model, batch, device), the batch mean.
    def loss_eager(model: torch.nn.Module, batch: dict, device: str) -> torch.Tensor:
        return model(**{k: v.to(device) for k, v in batch.items()}).loss

    def tracin() -> torch.Tensor:
        task = AttributionTask(loss_func=loss_unbatched, model=model, checkpoints=ckpt)
        attr = TracInAttributor(
            task,
            weight_list=[1.0],
            normalized_grad=True,
            proj_params=TracInProjectionParams(proj_dim=512),
            device=device,
            verbose=False,
        )
        return attr.attribute(train, test)

    def datainf() -> torch.Tensor:
        task = AttributionTask(loss_func=loss_batched, model=model, checkpoints=ckpt)
        attr = IFAttributorDataInf(task, device=device, verbose=False)
        attr.cache(train)
        return attr.attribute(train, test)

    def logra() -> torch.Tensor:
        task = AttributionTask(loss_func=loss_eager, model=model, checkpoints=ckpt)
        attr = LoGraAttributor(
            task,
            proj_params=LoGraProjectionParams(proj_dim_per_layer=64),
            offload="none",
            device=device,
            verbose=False,
        )
        attr.cache(train)
        return attr.attribute(train, test)

    print(
        f"{n_train} train / {n_test} test sequences, {n_topics} topics "
        f"(chance = {1 / n_topics:.2f})"
    )
    print(f"{'method':10s} {'top-5 proponents sharing the topic':>36s}")
    for name, fn in (("Grad-Cos", tracin), ("DataInf", datainf), ("LoGra", logra)):
        scores = fn().cpu()  # (n_train, n_test)
        top = scores.topk(5, dim=0).indices  # (5, n_test)
        hit = (train_topic[top] == test_topic[None, :]).float().mean()
        print(f"{name:10s} {float(hit):36.2f}")


if __name__ == "__main__":
    main()
