"""Prefect tasks for scaling laws: one IsoFLOP sweep run, and the fits that pick N and D."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
from prefect import task

from stages.common import config_hash, file_sha256, store_key, tree_sha256
from stages.downstream import DownstreamFitConfig, plot_two_step, score_models
from stages.scaling import FitConfig, fit_scaling
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run

ROOT = Path(__file__).resolve().parents[1]


class _Worker:
    """A ``tasks.sweep_worker --serve`` process: one core, torch imported once, runs handed over one at a time."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"sweep-worker-{os.getpid()}-{id(self):x}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._log_fh = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.sweep_worker", "--serve"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_fh, text=True)

    def run(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sweep worker exited with code {self.proc.wait()} (log: {self.log})")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_fh.close()


class _Workers:
    """Idle sweep workers, shared by the sweep's concurrent tasks (threads); stopped when the sweep ends."""

    def __init__(self):
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        from herd.settings import load_settings

        return _Worker(load_settings().home / "logs")

    def give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def stop_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.stop()


WORKERS = _Workers()
atexit.register(WORKERS.stop_all)


def train_in_worker(run: dict, train: dict, shape: dict, data: dict, store: str) -> tuple[Path, dict]:
    """Train one model of N scaling parameters on C/(6N) tokens in a sweep worker (one core), or find it trained:
    ``(its folder, its result.json)``. Stored under ``store/sweep/<hash of run, train, shape, data>``."""
    key = config_hash("sweep-run", run, train, shape, store_key(data["train"], store))
    out = Path(store) / "sweep" / key
    result_file = out / "result.json"
    if not result_file.exists():
        spec = {"run": run, "train": train, "data": data, "out": str(out), **shape}
        worker = WORKERS.take()
        try:
            answer = worker.run(spec)
        except Exception:
            worker.stop()
            raise
        WORKERS.give_back(worker)
        if not answer.get("ok"):
            raise RuntimeError(f"sweep run C={run['C']:.2e} N={run['N']} failed: {answer.get('error')} "
                               f"(log: {worker.log})")
    return out, json.loads(result_file.read_text())


@task(task_run_name="sweep-C{run[C]:.1e}-N{run[N]}")
def sweep_run_task(run: dict, train: dict, shape: dict, data: dict, store: str, parent_run_id: str | None) -> dict:
    """Train one (N, D) model of the sweep in its own process (one core each), return its held-out loss.

    ``shape`` is ``{"head_dim", "aspect"}``: how N maps onto a model shape (``ModelConfig.for_params``)."""
    out, res = train_in_worker(run, train, shape, data, store)
    with stage_run(f"sweep/C={run['C']:.1e}/N={run['N']}", None, parent_run_id) as rid:
        mlflow.log_params({"C": run["C"], "N_planned": run["N"], "N": res["N"], "D": res["tokens"],
                           **res.get("shape", {})})
        mlflow.log_metrics({"loss": res["loss"], "tokens": float(res["tokens"]), "seconds": float(res["seconds"])})
        log_dataset("tokens-train", data["train"], data.get("digest", ""), "input")
    return {"N": res["N"], "D": res["tokens"], "C": run["C"], "loss": res["loss"], "model_dir": str(out / "train" / "model")}


@task(task_run_name="scaling-fit")
def fit_task(cfg: FitConfig, runs_csv: str, output: str, target_budget: float, parent_run_id: str | None) -> dict:
    with stage_run("scaling/fit", cfg, parent_run_id) as rid:
        points = Path(runs_csv).parent / "downstream.json"  # the sweep models' benchmark numbers, where scored
        fit = fit_scaling(cfg, Path(runs_csv), Path(output), target_budget, points if points.is_file() else None)
        par, iso = fit["parametric"], fit["isoflop"]
        mlflow.log_metrics({f"parametric_{k}": float(v) for k, v in par.items() if isinstance(v, (int, float))}
                           | {f"isoflop_{k}": float(iso[k]) for k in ("a", "b") if iso.get(k) is not None}
                           | {f"recommended_{k}": float(v) for k, v in fit["recommendation"].items()})
        log_dataset("sweep-runs", runs_csv, file_sha256(runs_csv), "input")
        mlflow.log_artifact(str(Path(output) / "fit.json"))
        mlflow.log_artifact(str(Path(output) / "isoflop.png"))
    rec = fit["recommendation"]
    ci = fit.get("ci", {}).get("parametric", {})
    rows = [{"quantity": k, "value": (f"{par[k]:.4g}" if par.get(k) is not None else "-"),
             "95% CI": (f"[{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci and ci[k] else "")}
            for k in ("E", "A", "B", "alpha", "beta", "a", "b")]
    publish_markdown("scaling-fit", f"# Scaling-law fit\n\n{markdown_table(rows)}\n\nIsoFLOP a={iso.get('a')}, "
                     f"b={iso.get('b')}\n\n**Recommendation** for C={rec['C']:.3g} FLOPs: N={rec['N']:.3g} "
                     f"parameters, D={rec['D']:.3g} tokens.\n\nFigure `isoflop.png` in MLflow run: {run_url(rid)}\n",
                     "scaling-law fit and recommendation")
    return fit


def _anchor_dirs(cfg: DownstreamFitConfig) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The anchor models that are on this machine (relative folders from $HERD_HOME), and those that are not."""
    from herd.settings import load_settings

    home = load_settings().home
    found, missing = [], []
    for a in cfg.anchors:
        d = Path(a) if Path(a).is_absolute() else home / a
        if any(d.glob("*.safetensors")) and (d / "tokenizer_config.json").is_file():
            found.append((d.name, str(d), str(d)))
        else:
            missing.append(a)
    return found, missing


@task(task_run_name="downstream-points")
def downstream_points_task(rows: list[dict], cfg: DownstreamFitConfig, tokenizer_dir: str, out_dir: str, cache: str,
                           parent_run_id: str | None) -> dict:
    """Benchmark bpb and accuracy of every sweep model and of the anchors: step 2's points of the two-step
    prediction, written to ``downstream.json`` beside ``runs.csv``."""
    from stages.common import write_json_atomic

    path = Path(out_dir) / "downstream.json"
    anchors, missing = _anchor_dirs(cfg)
    want = {"config": cfg.model_dump(mode="json"), "models": sorted(r["model_dir"] for r in rows),
            "anchor_dirs": [a[1] for a in anchors]}
    if path.is_file():
        have = json.loads(path.read_text())
        if {k: have.get(k) for k in want} == want:
            return have
    with stage_run("scaling/downstream", cfg, parent_run_id) as rid:
        scored, chance = score_models([(r["model_dir"], r["model_dir"], tokenizer_dir) for r in rows], cfg, cache)
        by_dir = {r["model_dir"]: r for r in rows}
        points = [{"C": by_dir[p["label"]]["C"], "N": by_dir[p["label"]]["N"], "loss": by_dir[p["label"]]["loss"],
                   **{k: p[k] for k in ("task", "bpb", "acc")}} for p in scored]
        anchor_pts, _ = score_models(anchors, cfg, cache) if anchors else ([], chance)
        doc = {**want, "points": points, "anchors": anchor_pts, "chance": chance, "anchors_missing": missing}
        write_json_atomic(path, doc)
        mlflow.log_metrics({f"anchor_{a['label']}_{a['task']}_{m}": float(a[m]) for a in anchor_pts
                            for m in ("bpb", "acc")})
        mlflow.log_artifact(str(path))
    return doc


@task(task_run_name="downstream-check")
def downstream_check_task(fit_path: str, model_dir: str, tokenizer_dir: str, compute: float, cache: str,
                          parent_run_id: str | None) -> dict:
    """The main run's benchmark bpb and accuracy against what the two-step fit predicted for it before it
    trained (the same items): recorded in ``fit.json`` (``downstream.measured``), ``downstream.png`` and an
    MLflow run. Returns ``{task: {"predicted": {"bpb": [v, lo, hi], "acc": [...]}, "measured": {"bpb", "acc"}}}``."""
    from stages.common import write_json_atomic

    fit = json.loads(Path(fit_path).read_text())
    down = fit["downstream"]
    cfg = DownstreamFitConfig.model_validate(down["config"])
    with stage_run("scaling/downstream-check", cfg, parent_run_id) as rid:
        scored, _ = score_models([("main", model_dir, tokenizer_dir)], cfg, cache)
        measured = {p["task"]: {"bpb": p["bpb"], "acc": p["acc"]} for p in scored}
        down["measured"] = {"C": float(compute), "model_dir": model_dir, "tasks": measured}
        write_json_atomic(Path(fit_path), fit)
        d = json.loads(Path(down["points_file"]).read_text())
        plot_two_step(down, d["points"], d["anchors"], Path(fit_path).parent / "downstream.png", measured)
        metrics = {}
        for task, m in measured.items():
            pred = down["tasks"][task]["prediction"]
            metrics |= {f"{task}_bpb_measured": m["bpb"], f"{task}_bpb_predicted": pred["bpb"][0],
                        f"{task}_acc_measured": m["acc"]}
            if pred.get("acc"):
                metrics[f"{task}_acc_predicted"] = pred["acc"][0]
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(fit_path).parent / "downstream.png"))
        log_dataset("model", model_dir, tree_sha256(model_dir, "*.safetensors"), "input")
    return {task: {"predicted": down["tasks"][task]["prediction"], "measured": m} for task, m in measured.items()}
