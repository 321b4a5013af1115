"""Ours against Kronfluence 1.0.1 (EK-FAC) and upstream dattri 0.3.0 (TRAK) on corpus-nanogpt.

Side by side in one run, on the same prepared setting (the same data blocks, the same
trained GPT, the same half-subset checkpoints and the same LDS ground truth, from
``dattri-bench prepare``), scored by the same metric code (ours,
:func:`dattri.metric.lds` with its 95% CI, computed here in the parent process).

Every method runs in its own worker process, one at a time, each with the same thread
count, so that the cost columns compare like with like:

* ``cpu s``: the worker's process CPU time (all threads) from the start of the
  method (attributor built, checkpoints loaded) to the scores in hand;
* ``wall s``: the same span in wall-clock seconds;
* ``peak MB``: the worker's peak resident set size minus its resident size just
  before the method started (after imports and the data/model definitions).

Workers:

* ours: ``/work/venv``-style interpreter with this repository on ``PYTHONPATH``; runs
  :func:`dattri.benchmark.methods.run_method` (the ``dattri-bench run`` recipe), minus
  the self-influence pass that ``dattri-bench`` adds for noisy-label AUC (neither peer
  computes it);
* Kronfluence: its own virtualenv (``--kf-python``); never a dependency of ours;
* upstream dattri: its own virtualenv (``--up-python``), started with ``PYTHONPATH``
  removed and outside the repository, and checked to import the ``dattri`` of that
  virtualenv (both packages are called ``dattri``).

The peers get the model as our ``gpt.py`` file loaded by path (it imports only torch)
plus its configuration and state dicts; the char-LM wrapper (logits as ``(B, V, T)``)
is rebuilt in the worker. Settings:

* Kronfluence EK-FAC: every ``nn.Linear`` (the modules our EK-FAC uses), damping
  ``0.1 * mean(eigenvalues)`` per module (``damping_factor=None``, the rule our EK-FAC
  uses), measurement and training loss = the sequence's mean next-token loss (summed
  over a batch, as Kronfluence expects). Two rows: ``empirical Fisher`` (true labels;
  what our EK-FAC estimates: matched settings) and ``true Fisher`` (labels sampled from
  the model: Kronfluence's default).
* upstream TRAK: upstream's own nanoGPT recipe (output = log-odds of the sequence's
  mean-loss probability ``p = exp(-loss)``, ``correct_probability_func = p``), the
  projection dimension our TRAK uses (512), its default regularization (0); TRAK-1 on
  the attributed model and TRAK-k on the setting's k half-subset models (as our
  ``trak-1`` / ``trak-10`` rows).

"tuned" rows (``--no-tuned`` leaves them out): upstream's TRAK and ours with a fixed
regularization from the grid ``1e-8 ... 1e4`` instead of their default (upstream 0,
ours automatic), the value with the best LDS kept: chosen on the ground truth itself,
an optimistic figure for both. Their ``cpu s``/``wall s`` are those of the chosen
value's run; ``peak MB`` is over the whole sweep. The JSON keeps every value's LDS.

Sign: every row is ``(n_train, n_test)``, larger = the training block lowers the test
block's loss. Kronfluence's pairwise score ``g_test^T (F + d I)^-1 g_train`` has that
sign already (upweighting a training sample moves the loss by minus it); upstream TRAK
too. The run prints the correlation of each peer row with our row of the same method
as a check.

    OMP_NUM_THREADS=1 python benchmarks/bench_generative_peers.py --quick
    OMP_NUM_THREADS=1 python benchmarks/bench_generative_peers.py \
        --json benchmarks/results/corpus-nanogpt-peers.json \
        --markdown benchmarks/results/corpus-nanogpt-peers.md
    python benchmarks/bench_generative_peers.py --render benchmarks/results/corpus-nanogpt-peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: upstream TRAK regularization values of the "tuned" rows (best LDS kept: optimistic)
_SWEEP = [10.0**k for k in range(-8, 5)]
#: peer rows: label -> (library, options understood by the worker)
PEERS: dict[str, tuple[str, dict]] = {
    "kronfluence ekfac (empirical Fisher)": ("kf", {"empirical": True}),
    "kronfluence ekfac (true Fisher)": ("kf", {"empirical": False}),
    "upstream trak-1": ("up", {"ckpts": "full"}),
    "upstream trak-k": ("up", {"ckpts": "half"}),
    "upstream trak-1 (tuned)": ("up", {"ckpts": "full", "sweep": _SWEEP}),
    "upstream trak-k (tuned)": ("up", {"ckpts": "half", "sweep": _SWEEP}),
}
#: which row of ours each peer row is compared with (sign check, speed-up)
MATCH = {
    "kronfluence ekfac (empirical Fisher)": "if-ekfac",
    "kronfluence ekfac (true Fisher)": "if-ekfac",
    "upstream trak-1": "trak-1",
    "upstream trak-k": "trak-10",
    "upstream trak-1 (tuned)": "trak-1",
    "upstream trak-k (tuned)": "trak-10",
    "trak-1 (tuned)": "trak-1",
    "trak-10 (tuned)": "trak-10",
}


# ------------------------------------------------------------------ worker helpers
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load_model_module(model_file: str):
    """Our ``gpt.py`` loaded by path (no package import: it needs only torch)."""
    import importlib.util

    name = "_bench_peer_gpt"
    spec = importlib.util.spec_from_file_location(name, model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module


def _build_char_lm(spec: dict):
    """The benchmark's char LM (logits ``(B, V, T)``) from our GPT file and config."""
    from torch import nn

    gpt = _load_model_module(spec["model_file"])

    class CharLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = gpt.GPT(gpt.GPTConfig(**spec["config"]))
            for name, module in list(self.gpt.named_modules()):
                if isinstance(module, nn.Dropout):
                    parent, _, attr = name.rpartition(".")
                    setattr(self.gpt.get_submodule(parent), attr, nn.Identity())

        def forward(self, idx):
            logits, _ = self.gpt(idx)
            return logits.transpose(-1, -2)

    return CharLM()


def _seq_loss(logits, targets):
    """Per-sequence mean next-token loss ``(B,)`` of ``(B, V, T)`` logits."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, targets, reduction="none").mean(-1)


def _kronfluence_scores(spec: dict, opts: dict, workdir: str):
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import TensorDataset

    data = torch.load(spec["data"], weights_only=True)
    train = TensorDataset(data["x_train"], data["y_train"])
    test = TensorDataset(data["x_test"], data["y_test"])
    model = _build_char_lm(spec)
    model.load_state_dict(torch.load(spec["full"], weights_only=True))
    model.eval()

    class SequenceLM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model (true Fisher)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().transpose(-1, -2), dim=-1)
                    y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                    y = y.reshape(x.shape)
            return _seq_loss(logits, y).sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return _seq_loss(model(x), y).sum()

    task = SequenceLM()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="corpus",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=workdir,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=opts["empirical"])
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=64,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=test,
        train_dataset=train,
        per_device_query_batch_size=len(test),
        per_device_train_batch_size=64,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (n_test, n_train)
    return scores.T


def _upstream_trak_scores(spec: dict, opts: dict):
    from importlib.metadata import version

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import dattri
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    here = Path(dattri.__file__).resolve()
    if not here.is_relative_to(Path(sys.prefix).resolve()) or version("dattri") != "0.3.0":
        msg = f"the upstream worker imported {here} (version {version('dattri')}), "
        msg += f"not upstream dattri 0.3.0 of {sys.prefix}: pass --up-python of that venv."
        raise RuntimeError(msg)
    data = torch.load(spec["data"], weights_only=True)
    model = _build_char_lm(spec)
    model.eval()
    paths = [spec["full"]] if opts["ckpts"] == "full" else spec["half"]
    ckpts = [torch.load(p, weights_only=True) for p in paths]

    def margin(params, data_target_pair):  # upstream's nanoGPT TRAK output
        x, y = data_target_pair
        logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        logp = -_seq_loss(logits, y.unsqueeze(0)).squeeze(0)
        return logp - torch.log(1 - torch.exp(logp))

    def correct_p(params, data_target_pair):
        x, y = data_target_pair
        logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-_seq_loss(logits, y.unsqueeze(0)).squeeze(0))

    task = AttributionTask(loss_func=margin, model=model, checkpoints=ckpts)
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=64)
    test = DataLoader(TensorDataset(data["x_test"], data["y_test"]), batch_size=64)
    runs = []
    for reg in opts.get("sweep", [0.0]):  # one cache + attribute per value, timed apart
        c0, t0 = time.process_time(), time.perf_counter()
        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=correct_p,
            projector_kwargs={"proj_dim": spec["trak_proj_dim"], "proj_max_batch_size": 32},
            device="cpu",
            regularization=reg,
        )
        with torch.no_grad():
            attributor.cache(train)
            scores = attributor.attribute(test)
        runs.append((reg, scores, time.process_time() - c0, time.perf_counter() - t0))
    return runs


def _our_scores(spec: dict, method: str, opts: dict):
    from dattri.benchmark import methods
    from dattri.benchmark.prepare import PreparedSetting
    from dattri.benchmark.settings import get_setting

    # neither peer computes self-influence: skip the pass dattri-bench adds for the AUC
    inner = methods._inner_product
    methods._inner_product = lambda ctx, a, self_attr=False: inner(ctx, a, self_attr=False)
    from dattri.algorithm import factgrass, logra, trak

    for cls, name in (
        (trak.TRAKAttributor, "self_attribute"),
        (logra.LoGraAttributor, "compute_self_attribution"),
        (factgrass.FactGraSSAttributor, "compute_self_attribution"),
    ):
        setattr(cls, name, lambda self, *a, **k: __import__("torch").zeros(0))
    setting = get_setting(spec["setting"], quick=spec["quick"])
    prepared = PreparedSetting(setting, Path(spec["path"]))
    if "sweep" not in opts:
        return [(None, *_timed_cpu(lambda: methods.run_method(method, prepared).scores))]
    # the "tuned" rows: the benchmark's TRAK with a fixed regularization instead of the
    # automatic one, one run per value (the same grid as upstream's tuned rows)
    auto_trak = trak.TRAKAttributor
    runs = []
    for reg in opts["sweep"]:

        class FixedTRAK(auto_trak):
            def __init__(self, *a: object, _reg: float = reg, **k: object) -> None:
                k["regularization"] = _reg
                super().__init__(*a, **k)

        trak.TRAKAttributor = FixedTRAK
        runs.append((reg, *_timed_cpu(lambda: methods.run_method(method, prepared).scores)))
    trak.TRAKAttributor = auto_trak
    return runs


def _timed_cpu(fn):
    """``(fn(), process CPU seconds, wall seconds)``."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def _worker(lib: str, spec_file: str, method: str, opts_json: str, out_file: str) -> None:
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = json.loads(Path(spec_file).read_text())
    opts = json.loads(opts_json)
    if lib == "up":  # import upstream (and torch.func) before the clock starts
        import dattri.algorithm.trak
    elif lib == "kf":
        import kronfluence.analyzer  # noqa: F401
    else:
        import dattri.benchmark.methods  # noqa: F401
    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    if lib == "kf":
        with tempfile.TemporaryDirectory() as tmp:
            scores = _kronfluence_scores(spec, opts, tmp)
    elif lib == "up":
        runs = _upstream_trak_scores(spec, opts)
    else:
        runs = _our_scores(spec, method, opts)
    if lib == "kf":
        runs = [(None, scores, time.process_time() - c0, time.perf_counter() - t0)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(
        {
            "runs": [
                {
                    "regularization": reg,
                    "scores": torch.as_tensor(sc).detach().to(torch.float64).cpu(),
                    "cpu_s": cpu,
                    "wall_s": wall,
                }
                for reg, sc, cpu, wall in runs
            ],
            "peak_mb": peak - base,
            "peak_rss_mb": peak,
            "threads": threads,
        },
        out_file,
    )


# --------------------------------------------------------------------------- driver
def _run_worker(
    python: str,
    lib: str,
    spec_file: Path,
    method: str,
    opts: dict,
    timeout: float,
    workdir: Path,
) -> dict:
    """One worker process; returns its result dict or ``{"error": ...}``."""
    import torch

    out = workdir / f"{lib}_{method}_{abs(hash(json.dumps(opts, sort_keys=True)))}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if lib == "ours":
        env["PYTHONPATH"] = str(REPO)
    cmd = [python, str(Path(__file__).resolve()), "--worker", lib, str(spec_file), method]
    cmd += [json.dumps(opts), str(out)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0 or not out.exists():
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "Exception" in x]
        return {"error": (errors[-1] if errors else f"exit code {proc.returncode}")[:160]}
    return torch.load(out, weights_only=True)


def _spec(prepared, setting_name: str, quick: bool) -> dict:
    from dataclasses import asdict

    from dattri.params.projection import TRAKProjectionParams

    model = prepared.model("full")
    n_params = sum(p.numel() for p in model.parameters())
    proj = TRAKProjectionParams().proj_dim
    return {
        "setting": setting_name,
        "quick": quick,
        "path": str(prepared.path),
        "data": str(prepared.path / "data.pt"),
        "full": str(prepared.path / "models" / "full.pt"),
        "half": prepared.checkpoint_paths("half"),
        "model_file": str(REPO / "dattri" / "benchmark" / "models" / "gpt.py"),
        "config": asdict(model.gpt.config),
        # our TRAK projects to TRAKProjectionParams().proj_dim (identity when smaller)
        "trak_proj_dim": min(proj, n_params),
    }


def _corr(a, b) -> float:

    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main() -> None:
    """Prepare/load the setting, run ours and the peers, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="corpus-nanogpt")
    ap.add_argument("--quick", action="store_true", help="the setting's --quick sizes")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=None, help="ours (default: all that apply)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), help=f"of {list(PEERS)}")
    ap.add_argument("--python", default=sys.executable, help="interpreter for our workers")
    ap.add_argument("--kf-python", default="/work/peers/venv-kf/bin/python")
    ap.add_argument("--up-python", default="/work/peers/venv-up/bin/python")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    ap.add_argument(
        "--no-tuned",
        dest="tuned",
        action="store_false",
        help="leave out the rows whose regularization is chosen on the LDS itself",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here")
    ap.add_argument(
        "--render", type=Path, default=None, help="only print the table of a saved --json"
    )
    args = ap.parse_args()
    if args.render is not None:
        print(format_table(json.loads(args.render.read_text())))
        return

    import torch

    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.prepare import load_prepared, prepare
    from dattri.benchmark.run import run_metadata
    from dattri.benchmark.settings import get_setting
    from dattri.metric import lds

    setting = get_setting(args.setting, quick=args.quick)
    prepared = load_prepared(setting, args.cache_dir, quick=args.quick)
    if prepared is None:
        t0 = time.perf_counter()
        prepared = prepare(setting, args.cache_dir, quick=args.quick, verbose=False)
        print(f"prepare: {time.perf_counter() - t0:.1f} s")
    gt = prepared.lds_ground_truth()
    ours = args.methods or [m for m in METHODS if m not in setting.inapplicable]
    jobs = [("ours", m, m, {}) for m in ours]
    if args.tuned:
        jobs += [
            ("ours", f"{m} (tuned)", m, {"sweep": _SWEEP})
            for m in ("trak-1", "trak-10")
            if m in ours
        ]
    jobs += [
        (PEERS[p][0], p, "ekfac" if PEERS[p][0] == "kf" else "trak", PEERS[p][1])
        for p in args.peers
        if args.tuned or "tuned" not in p
    ]
    python = {"ours": args.python, "kf": args.kf_python, "up": args.up_python}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec_file = workdir / "spec.json"
        spec = _spec(prepared, args.setting, args.quick)
        spec_file.write_text(json.dumps(spec))
        for lib, label, method, opts in jobs:
            res = _run_worker(python[lib], lib, spec_file, method, opts, args.timeout, workdir)
            row = {
                "library": {
                    "ours": "dattri (ours)",
                    "kf": "kronfluence 1.0.1",
                    "up": "upstream dattri 0.3.0",
                }[lib],
                **{k: v for k, v in opts.items() if k != "sweep"},
            }
            if "error" in res:
                row["error"] = res["error"]
            else:
                best = None
                for run in res.pop("runs"):
                    scores = run.pop("scores")
                    if not bool(torch.isfinite(scores).all()):
                        run["lds"] = math.nan
                    else:
                        _, _, ci = lds(scores, gt, ci=0.95)
                        run.update(lds=ci.mean, lds_low=ci.low, lds_high=ci.high)
                    row.setdefault("tried", []).append(
                        {k: v for k, v in run.items() if k in ("regularization", "lds")}
                    )
                    if best is None or (run["lds"] > best[0]["lds"]) or math.isnan(best[0]["lds"]):
                        best = (run, scores)
                row.update(res)
                if math.isnan(best[0]["lds"]):
                    row["error"] = "non-finite scores"
                else:
                    row.update(best[0])
                    row["_scores"] = best[1]
                if len(row["tried"]) == 1:
                    del row["tried"]
            rows[label] = row
            print(
                f"{label}: LDS {_f(row.get('lds'))} cpu {_f(row.get('cpu_s'), 1)} s "
                f"{row.get('error', '')}",
                flush=True,
            )

    for label, ours_label in MATCH.items():
        if "_scores" in rows.get(label, {}) and "_scores" in rows.get(ours_label, {}):
            rows[label]["corr_with_ours"] = _corr(
                rows[label]["_scores"], rows[ours_label]["_scores"]
            )
    name = setting.name + (" (quick)" if args.quick else "")
    title = (
        f"{name}: ours vs Kronfluence EK-FAC vs upstream TRAK ({len(prepared.y_train)} "
        f"train / {len(prepared.y_test)} test blocks, {gt[0].shape[0]} LDS subsets x "
        f"{setting.runs_per_subset} seeds, {os.environ.get('OMP_NUM_THREADS', '1')} "
        "thread(s) per worker)"
    )
    doc = {
        "title": title,
        "setting": name,
        "spec": {k: v for k, v in spec.items() if k not in ("half", "path", "data", "full")},
        "num_half_models": len(spec["half"]),
        "our_method_kwargs": setting.method_kwargs,
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "_scores"} for k, v in rows.items()},
        "meta": run_metadata(),
    }
    table = format_table(doc)
    print("\n" + table)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")


def format_table(doc: dict) -> str:
    """The markdown table of a run (``doc`` as saved by ``--json``)."""
    lines = [
        f"### {doc['title']}",
        "",
        "| method | library | LDS | LDS 95% CI | cpu s | wall s | peak MB | corr. with ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in doc["rows"].items():
        if r.get("tried") and "regularization" in r:
            label = f"{label}, regularization {r['regularization']:g}"
        if "error" in r:
            lines.append(f"| {label} | {r['library']} | error: {r['error'][:100]} | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['library']} | {_f(r['lds'])} | [{_f(r['lds_low'])}, "
            f"{_f(r['lds_high'])}] | {_f(r['cpu_s'], 1)} | {_f(r['wall_s'], 1)} | "
            f"{_f(r['peak_mb'], 0)} | {_f(r.get('corr_with_ours'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:7])
    else:
        main()
