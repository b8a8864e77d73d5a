"""Prefect tasks for supervised fine-tuning: collect the conversations, fine-tune, log to MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task

from stages.common import config_hash, file_sha256, tree_sha256, store_key
from stages.sft import SFTConfig, sft
from stages.sft_data import SFTDataConfig, build_sft_data, read_conversations
from tasks.torchrun_stage import launch
from tasks.tracking import MlflowSink, log_dataset, markdown_table, publish_markdown, register_folder, run_url, \
    stage_run

REGISTERED = "sft"


@task(task_run_name="sft-data")
def sft_data_task(cfg: SFTDataConfig, store: str, cache: str, parent_run_id: str | None) -> dict:
    out = Path(store) / "sft_data" / config_hash("sft-data", cfg)
    with stage_run("sft/data", cfg, parent_run_id):
        man = build_sft_data(cfg, Path(cache), out)
        mlflow.log_metrics({f"conversations_{k}": float(v["conversations"]) for k, v in man["sources"].items()})
        log_dataset("sft-conversations", str(out / "conversations.jsonl.gz"),
                    file_sha256(out / "conversations.jsonl.gz"), "output", rows=man["conversations"])
        mlflow.log_dict(man, "sft_data_manifest.json")
    return {"path": str(out), "conversations": man["conversations"], "sources": man["sources"]}


@task(task_run_name="sft-train")
def sft_task(cfg: SFTConfig, base_model: str, tokenizer: str, data: dict, store: str,
             parent_run_id: str | None) -> dict:
    base_digest = tree_sha256(base_model, "*.safetensors")
    conversations = Path(data["path"]) / "conversations.jsonl.gz"
    inputs = {"base_model": (base_model, base_digest), "sft_data": (str(conversations), file_sha256(conversations)),
              "tokenizer": (tokenizer, file_sha256(Path(tokenizer) / "tokenizer.json"))}
    out = Path(store) / "sft" / config_hash("sft", cfg.train, cfg.tokenize, cfg.epochs, base_digest, store_key(data["path"], store),
                                           inputs["tokenizer"][1], *([cfg.nproc] if cfg.nproc > 1 else []))
    with stage_run("sft/train", cfg.train, parent_run_id, tags={"herd.base_model": base_model}) as rid:
        mlflow.log_params({"epochs": cfg.epochs, "base_model": base_model, "nproc": cfg.nproc})
        log_dataset("base-model", base_model, base_digest, "input")
        log_dataset("sft-conversations", *inputs["sft_data"], "input")
        log_dataset("tokenizer", *inputs["tokenizer"], "input")
        if cfg.nproc > 1:  # torchrun (train.parallelism): rank 0 writes the manifest, which the call below returns
            launch("sft", cfg, {"base_model_dir": base_model, "tokenizer_dir": tokenizer, "sft_data": data["path"],
                                "out_dir": str(out)}, cfg.nproc)
        with MlflowSink(rid) as sink:
            res = sft(cfg, base_model, tokenizer, read_conversations(Path(data["path"])), out, sink=sink)
        tr = res.train
        mlflow.log_metrics({"final_loss": tr.final_loss, "steps": float(res.steps), "tokens_per_s": tr.tokens_per_s}
                           | ({"heldout_loss": tr.heldout_loss} if tr.heldout_loss is not None else {})
                           | {f"heldout_loss_{k}": v for k, v in tr.heldout_loss_by_source.items()}
                           | {f"{s}_scored_tokens": float(v["scored_tokens"]) for s, v in res.tokens["splits"].items()})
        mlflow.log_artifacts(res.model_dir, "model")
        digest = tree_sha256(res.model_dir, "*.safetensors")
        log_dataset("sft-model", res.model_dir, digest, "output")
        version = register_folder(REGISTERED, rid, "model", res.model_dir, digest,
                                  {f"herd.{k}": p for k, (p, _) in inputs.items()}
                                  | {f"herd.{k}_digest": d for k, (_, d) in inputs.items()})
    rows = [{"split": s, **v} for s, v in res.tokens["splits"].items()]
    publish_markdown("sft", f"# Supervised fine-tuning\n\n{res.steps} steps ({cfg.epochs} epochs), final loss "
                     f"{tr.final_loss:.4f}, held-out answer loss {tr.heldout_loss if tr.heldout_loss is not None else '-'}"
                     f"\n\n{markdown_table(rows)}\n\nModel: `{res.model_dir}`, registered as `{REGISTERED}` "
                     f"v{version}\n\nMLflow run: {run_url(rid)}\n", "SFT")
    return {"model_dir": res.model_dir, "steps": res.steps, "final_loss": tr.final_loss,
            "heldout_loss": tr.heldout_loss, "tokens": res.tokens["splits"], "base_model": base_model,
            "registered": {"name": REGISTERED, "version": version}}
