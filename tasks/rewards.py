"""Prefect tasks for the preference loop: collect pairs from a policy, annotate them (simulated), train
and register the helpfulness and safety reward models."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import task

from stages.annotator import AnnotatorConfig
from stages.collect import CollectConfig, annotate_file, collect_pairs, prompt_pools
from stages.common import config_hash, file_sha256, tree_sha256
from stages.reward import RMConfig, staleness, train_reward_model
from stages.sft_data import read_conversations
from tasks.torchrun_stage import launch
from tasks.tracking import MlflowSink, log_dataset, markdown_table, publish_markdown, run_url, stage_run

MODEL_CODE = Path(__file__).with_name("reward_model_pyfunc.py")
REGISTERED = {"helpfulness": "rm-helpfulness", "safety": "rm-safety"}


def pools(sft_data: str, cfg: CollectConfig) -> dict[str, list[dict]]:
    return prompt_pools(read_conversations(Path(sft_data)), cfg.eval_fraction, cfg.seed)


@task(task_run_name="collect-batch-{batch_index}")
def collect_task(cfg: CollectConfig, model_dir: str, sft_data: str, batch_index: int, out_root: str,
                 parent_run_id: str | None) -> dict:
    """Two sampled responses per prompt from ``model_dir``: the next batch to annotate (``pairs.jsonl``)."""
    out = Path(out_root) / f"batch-{batch_index:03d}-{config_hash(cfg, tree_sha256(model_dir, '*.safetensors'))[:8]}"
    with stage_run("preferences/collect", cfg, parent_run_id, tags={"herd.policy": model_dir}) as rid:
        man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else \
            collect_pairs(cfg, model_dir, pools(sft_data, cfg)["collect"], out, batch_index)
        mlflow.log_metrics({"pairs": float(man["pairs"]), "safety_pairs": float(man["safety"]),
                            "generated_tokens_per_s": float(man["tokens_per_s"])})
        log_dataset("policy", model_dir, tree_sha256(model_dir, "*.safetensors"), "input")
        log_dataset("pairs-to-annotate", str(out / "pairs.jsonl"), tree_sha256(out, "pairs.jsonl"), "output",
                    rows=man["pairs"])
    publish_markdown("preference-collect", f"# Batch {batch_index} to annotate\n\n{man['pairs']} prompts "
                     f"({man['safety']} safety), two responses each at T={cfg.temperatures}; "
                     f"{man['tokens_per_s']:.0f} generated tokens/s.\n\nFile: `{out / 'pairs.jsonl'}`\n\n"
                     f"MLflow run: {run_url(rid)}\n", "pairs to annotate")
    return {**man, "pairs_file": str(out / "pairs.jsonl")}


@task(task_run_name="simulated-annotator")
def annotate_task(cfg: AnnotatorConfig, pairs_file: str, inbox: str, name: str,
                  parent_run_id: str | None = None) -> dict:
    """The simulated annotator labels a pairs file into an export in the inbox (as a human export would land); the
    inbox watcher is told it is herd's own (the calling flow ingests it), so it starts no round of its own. Its
    MLflow run records the pairs file it read and the export it wrote (lineage: export -> pairs -> policy)."""
    from herd.events import own_export

    export = Path(inbox) / f"{name}.jsonl"
    with own_export(inbox, export):
        res = annotate_file(pairs_file, export, cfg)
    pairs = Path(pairs_file)
    with stage_run("preferences/annotate", cfg, parent_run_id, tags={"herd.annotator": "simulated"}):
        log_dataset("pairs-to-annotate", str(pairs), tree_sha256(pairs.parent, pairs.name), "input")
        log_dataset("annotator-export", str(export), file_sha256(export), "output", rows=res.get("records"))
    return res


@task(task_run_name="rm-staleness-{cfg.category}")
def staleness_task(cfg: RMConfig, current_rm: str | None, batch_dir: str, parent_run_id: str | None) -> dict | None:
    """Score the current RM on a batch it has not seen, before retraining on it (Llama 2's weekly reason)."""
    if current_rm is None:
        return None
    res = staleness(current_rm, batch_dir, cfg)
    with stage_run(f"rm/{cfg.category}/staleness", None, parent_run_id,
                   tags={"herd.batch_id": Path(batch_dir).name}):
        if res["accuracy"] is not None:
            mlflow.log_metrics({"accuracy_on_new_batch": res["accuracy"], "pairs": float(res["pairs"])})
    return {"batch_id": Path(batch_dir).name, **res}


def registered_version(name: str, model_dir: str):
    """The registered version of ``name`` whose ``herd.model_dir`` is ``model_dir`` (None if there is none)."""
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    return next((v for v in versions if v.tags.get("herd.model_dir") == model_dir), None)


@task(task_run_name="rm-train-{cfg.category}")
def reward_model_task(cfg: RMConfig, init_dir: str, batch_dirs: list[str], store: str,
                      parent_run_id: str | None, nproc: int = 1) -> dict:
    """Train one RM on every batch so far, register it (``rm-<category>``) with the batches as its inputs;
    ``nproc`` > 1 trains it in that many processes under torchrun (``cfg.parallelism``)."""
    digests = [json.loads((Path(d) / "manifest.json").read_text())["digest"] for d in batch_dirs]
    out = Path(store) / "reward_models" / cfg.category / config_hash(cfg, tree_sha256(init_dir, "*.safetensors"),
                                                                     digests, *([nproc] if nproc > 1 else []))
    name = REGISTERED[cfg.category]
    known = registered_version(name, str(out / "model"))
    if known is not None:  # the same config, init and batches: trained and registered already
        res = train_reward_model(cfg, init_dir, batch_dirs, out)
        return {"category": cfg.category, "model_dir": res.model_dir, "version": int(known.version),
                "registered": name, "heldout": res.heldout, "train_pairs": res.train_pairs, "steps": res.steps,
                "batches": res.batches, "reused": True}
    with stage_run(f"rm/{cfg.category}/train", cfg, parent_run_id) as rid:
        mlflow.log_param("nproc", nproc)
        if nproc > 1:  # rank 0 writes the manifest, which the call below then returns
            launch("reward", cfg, {"init_dir": init_dir, "batch_dirs": batch_dirs, "out_dir": str(out)}, nproc)
        with MlflowSink(rid) as sink:
            res = train_reward_model(cfg, init_dir, batch_dirs, out, sink=sink)
        held = res.heldout
        mlflow.log_metrics({"final_loss": res.final_loss, "train_pairs": float(res.train_pairs)}
                           | ({"heldout_accuracy": held["accuracy"]} if held["accuracy"] is not None else {})
                           | {f"heldout_accuracy_{r}": v["accuracy"] for r, v in held["by_rating"].items()
                              if v["accuracy"] is not None}
                           | {f"heldout_accuracy_batch_{b}": v["accuracy"] for b, v in held["by_batch"].items()
                              if v["accuracy"] is not None})
        log_dataset("sft-model", init_dir, tree_sha256(init_dir, "*.safetensors"), "init")
        for d, dg in zip(batch_dirs, digests):
            log_dataset(f"preferences/{Path(d).name}", str(Path(d) / "data.parquet"), dg, "training")
        mlflow.log_dict(held, "heldout_eval.json")
        info = mlflow.pyfunc.log_model(name="reward-model", python_model=str(MODEL_CODE),
                                       artifacts={"model": res.model_dir}, model_config={"max_tokens": cfg.max_tokens},
                                       pip_requirements=["torch", "transformers", "pandas"],
                                       registered_model_name=name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "herd.batches", ",".join(Path(d).name for d in batch_dirs))
    client.set_model_version_tag(name, version, "herd.model_dir", res.model_dir)
    if held["accuracy"] is not None:
        client.set_model_version_tag(name, version, "heldout_accuracy", f"{held['accuracy']:.4f}")
    rows = [{"rating": r, "pairs": v["pairs"], "accuracy": None if v["accuracy"] is None else round(v["accuracy"], 3)}
            for r, v in held["by_rating"].items()]
    publish_markdown(f"rm-{cfg.category}", f"# {name} v{version}\n\ntrained on {len(batch_dirs)} batch(es), "
                     f"{res.train_pairs} pairs, {res.steps} steps; held-out accuracy {held['accuracy']}\n\n"
                     f"Per rating (Llama 2 Table 8):\n\n{markdown_table(rows)}\n\nMLflow run: {run_url(rid)}\n",
                     f"{cfg.category} reward model")
    return {"category": cfg.category, "model_dir": res.model_dir, "version": int(version), "registered": name,
            "heldout": held, "train_pairs": res.train_pairs, "steps": res.steps, "batches": res.batches}
