"""(Re)write the golden score files of every attributor (run by hand).

    cd <repo> && OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/golden/make_golden.py
    # only some entries (the problems file is kept):
    ... python tests/golden/make_golden.py --only if_cg_lr trak2_mlp
    # also rebuild the stored problems (retrains the models; changes every entry):
    ... python tests/golden/make_golden.py --problems

Writes ``tests/data/golden/<entry>.npz``, one file per entry of
:data:`tests.golden.cases.CASES`, holding the outputs (``scores``, ``self``,
``topk_*``, ...) and, as strings, ``settings`` (the case configuration as JSON),
``commit`` (``git describe --always --dirty`` of the library), ``torch`` and
``generated`` (UTC time). Before writing, every entry is run twice (must be bitwise
equal) and the entries with a closed form are checked against the brute-force
references of :mod:`tests.golden.reference` (explicit Hessian inverse, exact per-sample
gradient products, eigenspace truncation); the script stops on any mismatch.

Regenerate only for an intended change of the scores (say which and why in the commit
message); a refactoring must leave every file valid as is.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.golden.cases import (
    CASES,
    D_IN,
    DATA_DIR,
    DVEMB_EPOCHS,
    N_CLASSES,
    N_TEST,
    N_TRAIN,
    PROBLEMS_FILE,
    WD,
    load_problems,
    make_model,
)
from tests.golden.reference import closed_forms, rel_err


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude", "*"],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _train_lbfgs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Full-batch L-BFGS on mean CE + 0.5 * WD * ||theta||^2."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * WD * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)


def build_problems() -> dict[str, np.ndarray]:
    """Seeded data, trained LR / MLP, noisy extra checkpoints, DVEmb schedule."""
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_TEST
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, N_CLASSES, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64)).argmax(1)
    arrays: dict[str, np.ndarray] = {}
    for k, kind in enumerate(("lr", "mlp")):
        torch.manual_seed(k)
        model = make_model(kind)
        init = {n_: v.detach().clone() for n_, v in model.state_dict().items()}
        _train_lbfgs(model, x[:N_TRAIN], y[:N_TRAIN])
        p = f"{kind}/"
        arrays.update(
            {
                f"{p}x_train": x[:N_TRAIN].numpy(),
                f"{p}y_train": y[:N_TRAIN].numpy(),
                f"{p}x_test": x[N_TRAIN:].numpy(),
                f"{p}y_test": y[N_TRAIN:].numpy(),
            }
        )
        params = {n_: v.detach().clone() for n_, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(10 + k)
        for i in range(3):
            for n_, v in params.items():
                noise = 0 if i == 0 else 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                arrays[f"{p}ckpt{i}/{n_}"] = (v + noise).numpy()
        for n_, v in params.items():
            arrays[f"{p}params/{n_}"] = v.numpy()
        if kind == "mlp":
            for n_, v in init.items():
                arrays[f"{p}init/{n_}"] = v.numpy()
            sg = torch.Generator().manual_seed(20)
            sched = torch.stack(
                [torch.randperm(N_TRAIN, generator=sg) for _ in range(DVEMB_EPOCHS)]
            )
            arrays[f"{p}schedule"] = sched.numpy()
    return arrays


def _as_tensor(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="entries to regenerate")
    ap.add_argument("--problems", action="store_true", help="also rebuild problems.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    if args.problems or not PROBLEMS_FILE.exists():
        np.savez_compressed(PROBLEMS_FILE, **build_problems(), commit=np.array(commit))
        print(f"wrote {PROBLEMS_FILE}")
    problems = load_problems()
    names = args.only or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; known: {list(CASES)}")
    refs = closed_forms(problems)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in names:
        case = CASES[name]
        pb = problems[case.problem]
        out = case.run(pb)
        again = case.run(pb)
        for key, val in out.items():
            if not np.array_equal(val, again[key]):
                raise SystemExit(f"{name}: {key} differs between two runs (nondeterministic)")
        note = ""
        if name in refs:
            ref, tol = refs[name]
            for key, val in ref.items():
                err = rel_err(_as_tensor(out[key]), val)
                if not err <= tol:
                    raise SystemExit(f"{name}: {key} is {err:.2e} from the reference (tol {tol:g})")
                note += f" {key} vs reference {err:.1e} (tol {tol:g});"
        np.savez_compressed(
            DATA_DIR / f"{name}.npz",
            **out,
            settings=np.array(case.settings_json()),
            commit=np.array(commit),
            torch=np.array(torch.__version__),
            generated=np.array(stamp),
        )
        print(f"{name}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())};{note}")


if __name__ == "__main__":
    main()
