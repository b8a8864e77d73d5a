"""Prefect task around pretraining: pick the model size (a flavour, or the scaling fit's
recommendation), train with metrics batched into MLflow, log the model, held-out loss per source
and a few sampled generations."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import task

from stages.common import config_hash, file_sha256, store_key, tree_sha256
from stages.model import ModelConfig, num_params, scaling_params
from stages.pretrain import PretrainConfig, TokenSplit, pretrain
from stages.evaluation.report import compare_benchmarks
from stages.schedule import AnnealTestConfig, ContinueConfig, ProbeConfig, anneal_test, continue_pretraining
from stages.scaling import SweepConfig
from tasks.torchrun_stage import run_torchrun
from tasks.tracking import MlflowSink, log_dataset, markdown_table, publish_markdown, register_folder, run_url, \
    stage_run

REGISTERED = "base"

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of", "def main(", "Four score and seven years ago", "A dictionary is"]


def choose_model(size: str, fit: dict | None, vocab: int, cfg: PretrainConfig,
                 sweep: SweepConfig) -> tuple[ModelConfig, PretrainConfig]:
    """``size`` is a flavour name, or ``auto``: N and D from the scaling fit's recommendation, N mapped onto
    a shape by the sweep's rule (``head_dim``, ``aspect``) so the model is one the fit has seen the like of."""
    if size != "auto":
        return ModelConfig.from_flavour(size, max_seq_len=max(cfg.seq_len, 128)), cfg
    if not fit:
        raise ValueError("model size 'auto' needs a scaling fit: run `herd scaling sweep` and `herd scaling fit` "
                         "first, or name a flavour (debug, tiny, small, 7b)")
    rec = fit["recommendation"]
    model_cfg = ModelConfig.for_params(rec["N"], vocab_size=vocab, head_dim=sweep.head_dim, aspect=sweep.aspect,
                                       max_seq_len=max(cfg.seq_len, 128))
    return model_cfg, cfg.derive(max_tokens=max(cfg.batch_tokens, int(rec["D"])), steps=None)


def _samples(model_dir: Path, tokenizer_dir: str, n_tokens: int = 40) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
    out = []
    torch.manual_seed(0)
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=True, temperature=0.8, top_k=50,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append({"prompt": p, "completion": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


@task(task_run_name="pretrain-{size}")
def pretrain_task(cfg: PretrainConfig, size: str, fit: dict | None, sweep: SweepConfig, data: dict, tokenizer: dict,
                  store: str, nproc: int, parent_run_id: str | None) -> dict:
    vocab = TokenSplit(data["train"]).vocab_size
    model_cfg, run_cfg = choose_model(size, fit, vocab, cfg, sweep)
    out = Path(store) / "pretrain" / config_hash("pretrain", run_cfg, model_cfg, store_key(data["train"], store), nproc)
    with stage_run("pretrain/train", run_cfg, parent_run_id, tags={"herd.model_size": size}) as rid:
        mlflow.log_params({f"model.{k}": v for k, v in model_cfg.model_dump(mode="json").items()}
                          | {"model.num_params": num_params(model_cfg, vocab),
                             "model.scaling_params": scaling_params(model_cfg, vocab), "nproc": nproc})
        if nproc > 1:  # torchrun: DDP on gloo (CPU) or nccl (GPU); rank 0 writes result.json
            spec = {"pretrain": run_cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}
            run_torchrun(ROOT / "tasks" / "torchrun_pretrain.py", ["--config", json.dumps(spec), "--data",
                         data["train"], "--heldout", data["heldout"], "--out", str(out)], nproc, "pretraining")
            res = json.loads((out / "result.json").read_text())
        else:
            probe = None
            if run_cfg.downstream_every:  # OLMo's in-loop downstream evaluation: benchmark bpb next to the loss
                from herd.settings import load_settings
                from stages.evaluation.probe import DownstreamProbe

                probe = DownstreamProbe.from_cache(run_cfg.downstream_tasks, load_settings().cache, tokenizer["path"],
                                                   run_cfg.downstream_every, run_cfg.downstream_items)
            with MlflowSink(rid) as sink:
                res = pretrain(run_cfg, model_cfg, data["train"], data["heldout"], out, sink=sink,
                               downstream=probe).model_dump()
        metrics = {k: float(res[k]) for k in ("final_loss", "heldout_loss", "tokens_per_s", "mfu", "peak_mem_mb",
                                               "tokens", "steps", "flops_per_token")
                   if isinstance(res.get(k), (int, float))}
        metrics |= {f"heldout_loss_{s}": float(v) for s, v in (res.get("heldout_loss_by_source") or {}).items()}
        metrics |= {"num_params": float(num_params(model_cfg, vocab)), "total_params": float(res.get("num_params", 0)),
                    "scaling_params": float(scaling_params(model_cfg, vocab))}
        mlflow.log_metrics(metrics)
        inputs = {"tokens_train": (data["train"], tree_sha256(data["train"])),
                  "tokens_heldout": (data["heldout"], tree_sha256(data["heldout"]))}
        if tokenizer.get("path") and (Path(tokenizer["path"]) / "tokenizer.json").is_file():
            inputs["tokenizer"] = (tokenizer["path"], file_sha256(Path(tokenizer["path"]) / "tokenizer.json"))
        for key, (path, digest) in inputs.items():
            log_dataset(key.replace("_", "-"), path, digest, "input")
        model_dir = Path(res["model_dir"])
        samples = _samples(model_dir, tokenizer["path"])
        mlflow.log_text("\n\n".join(f"### {s['prompt']}\n{s['prompt']}{s['completion']}" for s in samples),
                        "samples.md")
        mlflow.log_artifacts(str(model_dir), "model")
        digest = tree_sha256(model_dir, "*.safetensors")
        log_dataset("model", str(model_dir), digest, "output")
        version = register_folder(REGISTERED, rid, "model", str(model_dir), digest,
                                  {f"herd.{k}": p for k, (p, _) in inputs.items()}
                                  | {f"herd.{k}_digest": d for k, (_, d) in inputs.items()} | {"herd.size": size,
                                                                                              "herd.stage": "main"})
    rows = [{"source": s, "held-out loss": round(v, 4)} for s, v in (res.get("heldout_loss_by_source") or {}).items()]
    publish_markdown("pretrain", f"# Pretraining ({size}: {metrics.get('num_params', 0):.3g} params, "
                     f"{metrics.get('tokens', 0):.3g} tokens)\n\nfinal train loss {res['final_loss']:.4f}, held-out "
                     f"{res.get('heldout_loss') or float('nan'):.4f}; {res['tokens_per_s']:.0f} tokens/s, MFU "
                     f"{100 * res['mfu']:.1f}%\n\n{markdown_table(rows)}\n\n## Samples\n\n"
                     + "".join(f"- **{s['prompt']}**{s['completion']!r}\n" for s in samples)
                     + f"\nRegistered as `{REGISTERED}` v{version}. MLflow run: {run_url(rid)}\n", "pretraining result")
    return {**{k: res.get(k) for k in ("final_loss", "heldout_loss", "heldout_loss_by_source", "tokens",
                                       "tokens_per_s", "mfu", "model_dir")},
            "num_params": num_params(model_cfg, vocab), "total_params": res.get("num_params"),
            "scaling_params": scaling_params(model_cfg, vocab),
            "size": size, "model": model_cfg.model_dump(mode="json"), "samples": samples,
            "registered": {"name": REGISTERED, "version": version}}


@task(task_run_name="pretrain-{cfg.name}")
def continue_task(cfg: ContinueConfig, init_model_dir: str, main_model_dir: str, data: dict, tokenizer: dict,
                  store: str, parent_run_id: str | None) -> dict:
    """One stage after the main run (a long-context stage or the anneal): train, measure, log, register as a
    version of ``base`` tagged with its stage."""
    out = Path(store) / "pretrain" / cfg.name / config_hash("continue", cfg, init_model_dir,
                                                           store_key(data["train"], store))
    tok_dir = tokenizer.get("path") or None
    with stage_run(f"pretrain/{cfg.name}", cfg.train, parent_run_id, tags={"herd.pretrain_stage": cfg.name}) as rid:
        mlflow.log_params({"stage.rope_theta": cfg.rope_theta, "stage.init_model_dir": init_model_dir})
        with MlflowSink(rid) as sink:
            res = continue_pretraining(cfg, init_model_dir, data["train"], data["heldout"], out,
                                       main_model_dir=main_model_dir, tokenizer_dir=tok_dir, sink=sink)
        t = res.train
        metrics = {k: float(v) for k, v in (("final_loss", t.final_loss), ("heldout_loss", t.heldout_loss),
                                              ("heldout_loss_last", t.heldout_loss_last), ("tokens", t.tokens),
                                              ("tokens_per_s", t.tokens_per_s), ("short_loss", res.short_loss),
                                              ("short_loss_last", res.short_loss_last),
                                              ("main_short_loss", res.main_short_loss)) if v is not None}
        for label, losses in res.position_loss.items():
            metrics |= {f"position_loss_{label}/{b}": v for b, v in losses.items()}
        for label, acc in res.passkey.items():
            metrics |= {f"passkey_{label}/{n}": v for n, v in acc.items()}
        mlflow.log_metrics(metrics)
        if res.passed is not None:
            mlflow.set_tag("herd.short_context_recovered", str(res.passed).lower())
        if res.figure:
            mlflow.log_artifact(res.figure)
        log_dataset("model-in", init_model_dir, tree_sha256(init_model_dir, "*.safetensors"), "input")
        log_dataset("tokens-train", data["train"], tree_sha256(data["train"]), "input")
        mlflow.log_artifacts(res.model_dir, "model")
        digest = tree_sha256(res.model_dir, "*.safetensors")
        log_dataset("model", res.model_dir, digest, "output")
        version = register_folder(REGISTERED, rid, "model", res.model_dir, digest,
                                  {"herd.stage": cfg.name, "herd.parent_model_dir": init_model_dir,
                                   "herd.tokens_train": data["train"], "herd.seq_len": str(res.seq_len),
                                   "herd.rope_theta": str(res.rope_theta)})
    rows = [{"position": b, **{label: round(v.get(b, float("nan")), 4) for label, v in res.position_loss.items()}}
            for b in (res.position_loss.get("after") or {})]
    check = "" if res.passed is None else (
        f"short-context held-out loss (seq_len {cfg.probe.main_seq_len}) {res.short_loss:.4f} against the main "
        f"run's {res.main_short_loss:.4f}: {'recovered' if res.passed else 'NOT recovered'}\n\n")
    avg = "" if t.heldout_loss_last is None else (
        f"held-out loss of the mean of {t.averaged} checkpoints {t.heldout_loss:.4f}, of the last weights "
        f"{t.heldout_loss_last:.4f}\n\n")
    keys = "".join(f"- passkey {label}: " + ", ".join(f"{n} tokens {100 * a:.0f}%" for n, a in acc.items()) + "\n"
                   for label, acc in res.passkey.items() if acc)
    publish_markdown(f"pretrain-{cfg.name}", f"# Pretraining stage {cfg.name} (seq_len {res.seq_len}, RoPE theta "
                     f"{res.rope_theta:g}, {t.tokens} tokens)\n\n{check}{avg}"
                     + (markdown_table(rows) + "\n\n" if rows else "") + keys
                     + f"\nRegistered as `{REGISTERED}` v{version}. MLflow run: {run_url(rid)}\n",
                     f"pretraining stage {cfg.name}")
    return {"stage": cfg.name, "model_dir": res.model_dir, "last_model_dir": res.last_model_dir,
            "seq_len": res.seq_len, "rope_theta": res.rope_theta, "tokens": t.tokens, "final_loss": t.final_loss,
            "heldout_loss": t.heldout_loss, "heldout_loss_last": t.heldout_loss_last, "averaged": t.averaged,
            "position_loss": res.position_loss, "short_loss": res.short_loss, "main_short_loss": res.main_short_loss,
            "short_loss_last": res.short_loss_last, "passed": res.passed, "passkey": res.passkey, "registered": {"name": REGISTERED, "version": version}}


@task(task_run_name="anneal-test")
def anneal_test_task(cfg: AnnealTestConfig, main: PretrainConfig, probe: ProbeConfig, model_dir: str, data: dict,
                     dataset: str, tokenizer_dir: str, store: str, parent_run_id: str | None) -> dict:
    """Two anneals of ``model_dir``, with and without ``dataset`` (Llama 3's data ablation), recorded in MLflow."""
    out = Path(store) / "anneal_test" / config_hash("anneal-test", cfg, main, probe, model_dir, file_sha256(dataset),
                                                    store_key(data["train"], store))
    with stage_run("pretrain/anneal-test", cfg, parent_run_id) as rid:
        with MlflowSink(rid) as sink:
            res = anneal_test(cfg, main, probe, model_dir, data["train"], data["heldout"], dataset, tokenizer_dir,
                              out, sink=sink)
        log_dataset("dataset", dataset, file_sha256(dataset), "input")
        log_dataset("model-in", model_dir, tree_sha256(model_dir, "*.safetensors"), "input")
        for label, r in (("with", res.with_dataset), ("without", res.without_dataset)):
            log_dataset(f"model-{label}", r.model_dir, tree_sha256(r.model_dir, "*.safetensors"), "output")
            mlflow.log_metrics({f"{label}_heldout_loss": float(r.train.heldout_loss or float("nan")),
                                f"{label}_short_loss": float(r.short_loss or float("nan"))})
        mlflow.log_metrics({"dataset_tokens": float(res.dataset_tokens), "dataset_share": res.share})
    return {"with": res.with_dataset.model_dir, "without": res.without_dataset.model_dir,
            "dataset_docs": res.dataset_docs, "dataset_tokens": res.dataset_tokens, "share": res.share,
            "heldout_loss": {"with": res.with_dataset.short_loss, "without": res.without_dataset.short_loss},
            "run_id": rid}


@task(task_run_name="anneal-test-compare")
def anneal_compare_task(with_tasks: dict, without_tasks: dict, dataset: str, res: dict) -> dict:
    """The benchmarks of the anneal with the dataset minus those without it, with 95% intervals, as an artifact."""
    deltas = compare_benchmarks(with_tasks, without_tasks)
    rows = [{"benchmark": t, **{k: (f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" if k == "bpb" else
                                    f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]") for k, v in d.items()}}
            for t, d in deltas.items()]
    publish_markdown("anneal-test", f"# Anneal test of {dataset}\n\n{res['dataset_docs']} documents, "
                     f"{res['dataset_tokens']} tokens, {100 * res['share']:.0f}% of the anneal's windows. Benchmarks "
                     f"of the anneal with the dataset minus without it (points of the headline metric; bpb: lower is "
                     f"better; 95% intervals):\n\n{markdown_table(rows)}\n", "anneal test")
    return deltas
