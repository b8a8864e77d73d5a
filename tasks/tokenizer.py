"""Prefect tasks around the tokenizer: train the byte-level BPE, report compression, tokenize shards."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task

from stages.common import config_hash, file_sha256, tree_sha256
from stages.tokenizer import TokenizeConfig, TokenizerConfig, compression, input_files, tokenize_corpus, train_tokenizer
from tasks.tracking import MlflowSink, log_dataset, markdown_table, publish_markdown, run_url, stage_run


def _digest(paths: list[Path]) -> str:
    return config_hash([file_sha256(p) for p in input_files(paths)])


@task(task_run_name="tokenizer-train")
def tokenizer_task(cfg: TokenizerConfig, inputs: list[str], store: str, output: str | None,
                   parent_run_id: str | None) -> dict:
    paths = [Path(p) for p in inputs]
    digest = _digest(paths)
    out = Path(output) if output else Path(store) / "tokenizer" / config_hash("tokenizer", cfg, digest)
    with stage_run("tokenizer/train", cfg, parent_run_id) as rid:
        with MlflowSink(rid) as sink:
            res = train_tokenizer(cfg, paths, out, sink=sink)
        comp = compression(out, paths)
        mlflow.log_metrics({"vocab_size": float(res["vocab_size"]), "train_chars": float(res["train_chars"])}
                           | {f"chars_per_token_{s}": float(v["chars_per_token"]) for s, v in comp.items()})
        for p in input_files(paths):
            log_dataset(p.name, str(p), file_sha256(p), "input")
        log_dataset("tokenizer", str(out), res["sha256"], "output")
        mlflow.log_dict(comp, "compression.json")
        mlflow.log_artifacts(str(out), "tokenizer")
    rows = [{"source": s, "docs": v["docs"], "chars": v["chars"], "tokens": v["tokens"],
             "chars/token": round(v["chars_per_token"], 3)} for s, v in comp.items()]
    publish_markdown("tokenizer", f"# Tokenizer (byte-level BPE, vocab {res['vocab_size']})\n\n"
                     f"Compression per source (Llama 3 reports 3.17 -> 3.94 chars/token for its change):\n\n"
                     f"{markdown_table(rows)}\n\nSaved at `{out}`\n\nMLflow run: {run_url(rid)}\n", "tokenizer")
    return {"path": str(out), "sha256": res["sha256"], "vocab_size": res["vocab_size"], "compression": comp}


def trained_tokenizer(path: str) -> dict:
    """A tokenizer ``train_tokenizer`` wrote (its manifest's result: path, sha256, vocab size), with its compression
    left out; a folder without that manifest is an error naming it."""
    from stages.common import read_manifest
    from stages.errors import ConfigError

    man = read_manifest(Path(path))
    if not man or "result" not in man:
        raise ConfigError(f"{path}: not a tokenizer herd trained (no manifest.json with a result)")
    return {**man["result"], "path": str(path), "compression": {}}


@task(task_run_name="tokenize")
def tokenize_task(cfg: TokenizeConfig, tokenizer: dict, inputs: list[str], store: str,
                  parent_run_id: str | None) -> dict:
    paths = [Path(p) for p in inputs]
    out = Path(store) / "tokens" / config_hash("tokenize", cfg, tokenizer["sha256"], _digest(paths))
    with stage_run("tokenizer/tokenize", cfg, parent_run_id) as rid:
        with MlflowSink(rid) as sink:
            man = tokenize_corpus(cfg, Path(tokenizer["path"]), paths, out, sink=sink)
        for split in ("train", "heldout"):
            if (out / split).exists():
                log_dataset(f"tokens-{split}", str(out / split), tree_sha256(out / split), "output")
        log_dataset("tokenizer", tokenizer["path"], tokenizer["sha256"], "input")
        for f in input_files(paths):  # the mixture it tokenized (lineage: tokens -> mixture, not only the tokenizer)
            log_dataset(f.name, str(f), file_sha256(f), "input")
        mlflow.log_dict(man, "tokens_manifest.json")
    return {"path": str(out), "train": str(out / "train"), "heldout": str(out / "heldout"), "manifest": man}
