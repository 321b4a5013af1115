"""TRAK over several processes with torch.distributed, a resumable store and a score file.

Each process featurizes its contiguous share of the training batches into a shared
on-disk feature store (``--out-dir/store``; rerunning after an interruption resumes),
then scores its share of the training rows into one ``.npy`` score file
(``--out-dir/scores.npy``) and prints the most helpful training samples of a few test
digits. Without ``torchrun`` it runs as a single process with the same result.

    torchrun --nproc_per_node 2 examples/torchrun_attribute.py --out-dir /tmp/run
    python examples/torchrun_attribute.py --quick --out-dir /tmp/run
    torchrun --nproc_per_node 2 examples/torchrun_attribute.py --device cuda   # NCCL
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _common import device_from, digits, loader, margin_sample, parser, prob_sample, train_lr

from dattri.algorithm import TRAKAttributor
from dattri.params.projection import TRAKProjectionParams
from dattri.task import AttributionTask


def setup(device_name: str) -> tuple[torch.device, int, int]:
    """Join the process group started by torchrun (if any): ``(device, rank, world)``."""
    if "RANK" not in os.environ:  # plain `python`: one process, no process group
        return device_from(device_name), 0, 1
    device = device_from(device_name)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def main() -> None:
    """Train, cache the training features over all ranks, score to a file."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="torchrun_out", help="store and score file folder")
    p.add_argument("--store-dtype", default="float16", help="feature storage dtype")
    p.add_argument("--max-memory", default="256MB", help="working-memory budget")
    args = p.parse_args()
    device, rank, world = setup(args.device)
    n_train, n_test = (300, 20) if args.quick else (1500, 200)
    x_tr, y_tr, x_te, y_te = digits(n_train, n_test, seed=args.seed)
    model = train_lr(x_tr, y_tr, device, seed=args.seed)
    if world > 1:  # every rank attributes the very same model: take rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    task = AttributionTask(margin_sample(model), model, model.state_dict())
    out_dir = Path(args.out_dir)
    attributor = TRAKAttributor(
        task,
        prob_sample(model),
        TRAKProjectionParams(proj_dim=512),
        device=device,
        regularization=1e-3,
        verbose=rank == 0,
        cache_dir=out_dir / "store",
        store_dtype=args.store_dtype,
        max_memory=args.max_memory,
    )
    train, test = loader(x_tr, y_tr, batch_size=64), loader(x_te, y_te, batch_size=64)
    attributor.cache(train)  # each rank featurizes its batches into the shared store
    scores = attributor.attribute(test, out=out_dir / "scores.npy")  # every rank: all rows
    top = attributor.attribute_topk(None, test, k=3)
    if rank == 0:
        on_disk = np.load(out_dir / "scores.npy", mmap_mode="r")
        print(f"{world} process(es); scores {tuple(scores.shape)} in {out_dir / 'scores.npy'}")
        print(f"score file matches the returned scores: {np.allclose(on_disk, scores.numpy())}")
        for j in range(3):
            helpful = top.helpful_indices[j].tolist()
            labels = [int(y_tr[i]) for i in helpful]
            print(f"test {j} (digit {int(y_te[j])}): most helpful train {helpful}, digits {labels}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
