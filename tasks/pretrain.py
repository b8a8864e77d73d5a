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
                                  | {f"herd.{k}_digest": d for k, (_, d) in inputs.items()} | {"herd.size": size})
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
