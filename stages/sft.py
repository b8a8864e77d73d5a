"""Supervised fine-tuning: conversations -> answer-only loss -> the trainer of ``stages.pretrain``.

SFT reuses the pretraining loop (AdamW, warmup + cosine, packed sequences with document masking,
exact resume, DDP): the conversations are tokenized with a loss mask (``stages.sft_data``), so only
answer tokens are scored, and training starts from a saved base model instead of a fresh init. The
base is herd's pretrained model or any saved ``LlamaForCausalLM`` with its tokenizer (e.g. a
converted SmolLM2-135M): most users fine-tune a model they already have.

Output ``out_dir/``: ``model/`` (safetensors + the tokenizer, so the folder is self-contained),
``tokens/`` (the masked splits), ``train/`` (checkpoints, metrics) and ``manifest.json`` (last).

Distributed (``sft.nproc`` > 1, launched by ``tasks/torchrun_stage.py``): rank 0 tokenizes and writes the
outputs; the pretraining loop runs on every process (``train.parallelism``: DDP or FSDP2).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from stages.common import NULL_SINK, MetricsSink, StageConfig, atomic_dir, link_or_copy, read_manifest, write_json_atomic
from stages.distributed import Processes, check_train_processes
from stages.errors import DataValidationError, MissingAssetError
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig, PretrainResult, TokenSplit, pretrain
from stages.sft_data import SFTDataConfig, SFTTokenizeConfig, tokenize_chats

log = logging.getLogger(__name__)


def _sft_train_defaults() -> PretrainConfig:
    # Llama 2 SFT: lr 2e-5, weight decay 0.1, cosine, seq 4096, batch 64; scaled for small models in presets
    return PretrainConfig(lr=2e-5, warmup_steps=5, seq_len=512, batch_tokens=8192, micro_batch_size=4,
                          weight_decay=0.1, log_every=10, eval_tokens=65_536)


class SFTConfig(StageConfig):
    """Data, tokenization and optimisation of supervised fine-tuning."""

    data: SFTDataConfig = Field(default_factory=SFTDataConfig, description="conversation sources, safety, GAtt")
    tokenize: SFTTokenizeConfig = Field(default_factory=SFTTokenizeConfig, description="chat rendering and cuts")
    train: PretrainConfig = Field(default_factory=_sft_train_defaults,
                                  description="optimiser and loop (steps come from epochs)")
    epochs: float = Field(2.0, gt=0, description="passes over the SFT data (Llama 2: 2)")
    base: str = Field("pretrained", description="'pretrained' (herd's latest pretrained model) or a folder with a "
                      "saved LlamaForCausalLM and its tokenizer")
    nproc: int = Field(1, ge=1, description="processes; > 1 launches torchrun (train.parallelism: DDP or FSDP2, on "
                       "gloo/nccl)")

    @model_validator(mode="after")
    def _processes(self) -> SFTConfig:
        check_train_processes(self.nproc, self.train)
        return self


class SFTResult(BaseModel):
    model_dir: str
    steps: int
    epochs: float
    train: PretrainResult
    tokens: dict
    base_model_dir: str


def sft(cfg: SFTConfig, base_model_dir: str | Path, tokenizer_dir: str | Path, conversations: list[dict],
        out_dir: str | Path, *, sink: MetricsSink = NULL_SINK, stop_after_steps: int | None = None) -> SFTResult:
    """Fine-tune ``base_model_dir`` on ``conversations`` (answer tokens only) into ``out_dir/model``. Under torchrun
    every process calls it (with the same conversations): rank 0 tokenizes and writes the outputs."""
    out_dir, base_model_dir, tokenizer_dir = Path(out_dir), Path(base_model_dir), Path(tokenizer_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return SFTResult.model_validate(done["result"])
    procs = Processes.current(cfg.train.parallelism, fix="set sft.nproc to 2 or more, or train.parallelism: ddp")
    if not conversations and read_manifest(out_dir / "tokens") is None:
        raise DataValidationError("no conversations to fine-tune on: the SFT data is empty (check the SFT data "
                                  "sources and caps)")
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise MissingAssetError(f"no tokenizer in {tokenizer_dir}: SFT needs the base model's tokenizer")
    model_cfg = ModelConfig.from_pretrained(base_model_dir)
    if cfg.train.seq_len > model_cfg.max_seq_len:  # RoPE has no hard limit; positions past it are new to the model
        log.warning("SFT seq_len %d exceeds the base model's trained context %d (%s); RoPE extends it",
                    cfg.train.seq_len, model_cfg.max_seq_len, base_model_dir)
        model_cfg = model_cfg.derive(max_seq_len=cfg.train.seq_len)
    tok_dir = out_dir / "tokens"
    tokens = read_manifest(tok_dir)
    if tokens is None:  # one process writes the splits, the others read them
        if procs.rank == 0:
            tokens = tokenize_chats(cfg.tokenize, tokenizer_dir, conversations, tok_dir)
        procs.barrier()
        tokens = tokens or read_manifest(tok_dir)
    train_split = TokenSplit(tok_dir / "train")
    windows = train_split.n_windows(cfg.train.seq_len)
    if windows <= 0:
        raise DataValidationError(
            f"{len(conversations)} conversation(s) give {len(train_split)} training tokens: too few for one sequence "
            f"of train.seq_len={cfg.train.seq_len}; add conversations or lower train.seq_len",
            file=str(tok_dir / "train"), field="train.seq_len")
    steps = max(1, math.ceil(cfg.epochs * windows / cfg.train.sequences_per_batch))
    log.info("SFT: %d packed windows of %d tokens, %.3g epochs -> %d steps of %d sequences", windows,
             cfg.train.seq_len, cfg.epochs, steps, cfg.train.sequences_per_batch)
    heldout = tok_dir / "heldout"
    res = pretrain(cfg.train.derive(steps=steps), model_cfg, tok_dir / "train",
                   heldout if TokenSplit(heldout).n_windows(cfg.train.seq_len) else None, out_dir / "train",
                   sink=sink, init_model_dir=base_model_dir, stop_after_steps=stop_after_steps)
    if not res.completed:
        return SFTResult(model_dir="", steps=res.steps, epochs=cfg.epochs, train=res, tokens=tokens,
                         base_model_dir=str(base_model_dir))
    result = SFTResult(model_dir=str(out_dir / "model"), steps=steps, epochs=cfg.epochs, train=res, tokens=tokens,
                       base_model_dir=str(base_model_dir))
    if procs.rank == 0:
        with atomic_dir(out_dir / "model") as tmp:
            for f in Path(res.model_dir).iterdir():
                link_or_copy(f, tmp / f.name)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(tmp)
        write_json_atomic(out_dir / "manifest.json", {"stage": "sft", "config": cfg.model_dump(mode="json"),
                                                      "result": result.model_dump(mode="json")})
    procs.barrier()
    return result
