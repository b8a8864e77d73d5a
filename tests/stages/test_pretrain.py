from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stages.common import MemorySink
from stages.errors import ConfigError, DivergenceError
from stages.model import ModelConfig
from stages.pretrain import (
    IGNORE_INDEX,
    PretrainConfig,
    TokenSplit,
    causal_lm_loss,
    load_loss_history,
    lr_factor,
    pretrain,
)
from tests.stages._tokens import random_split, write_split

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_flavour("debug", attn_implementation="eager")
CFG = PretrainConfig(
    steps=8, seq_len=32, batch_tokens=256, micro_batch_size=2, lr=3e-3, warmup_steps=2, log_every=1,
    num_threads=1, peak_flops=1e12, eval_tokens=512,
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return random_split(d / "train", 80, seed=0), random_split(d / "heldout", 20, seed=1)


def test_causal_lm_loss_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # (B=1, T=2, V=2)
    labels = torch.tensor([[1, IGNORE_INDEX]])
    loss_sum, n = causal_lm_loss(logits, labels)
    assert n.item() == 1 and loss_sum.item() == pytest.approx(math.log(2))
    loss_sum, n = causal_lm_loss(logits, torch.tensor([[1, 1]]))
    assert loss_sum.item() == pytest.approx(math.log(2) + math.log(1 + math.exp(2)))


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)


def test_config_validation_names_fields():
    with pytest.raises(ValidationError, match="batch_tokens"):
        PretrainConfig(seq_len=32, batch_tokens=100)
    with pytest.raises(ValidationError, match="micro_batch_size"):
        PretrainConfig(seq_len=32, batch_tokens=32 * 6, micro_batch_size=4)
    cfg = PretrainConfig(seq_len=32, batch_tokens=32 * 8, micro_batch_size=2)
    assert cfg.grad_accum_steps(1) == 4 and cfg.grad_accum_steps(2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size"):
        cfg.grad_accum_steps(3)
    assert PretrainConfig().beta2 == 0.95 and PretrainConfig().eps == 1e-5 and PretrainConfig().weight_decay == 0.1


def test_reader_masks_labels_across_documents(tmp_path):
    split = write_split(tmp_path, [np.array([1, 2, 3]), np.array([7, 8])], ["a", "b"], 10)
    s = TokenSplit(split)
    ids, labels, docs = s.windows(np.array([0]), 4)
    assert ids.tolist() == [[1, 2, 3, 7]]
    assert labels.tolist() == [[2, 3, IGNORE_INDEX, 8]]
    assert docs.tolist() == [[0, 0, 0, 1, 1]]


def test_learning_happens_and_outputs(splits, tmp_path):
    train, heldout = splits
    sink = MemorySink()
    cfg = CFG.derive(steps=30, eval_every=10)
    res = pretrain(cfg, MODEL, train, heldout, tmp_path / "run", sink=sink)
    losses = load_loss_history(tmp_path / "run")
    assert len(losses) == 30 and res.completed
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3])
    assert set(res.heldout_loss_by_source) == {"web", "code"} and res.heldout_loss < losses[0]
    assert (Path(res.model_dir) / "model.safetensors").is_file()
    assert (tmp_path / "run" / "manifest.json").is_file()
    logged = [m for _, m in sink.rows if "loss" in m]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb"} <= set(logged[0])
    assert any("heldout_loss/web" in m for _, m in sink.rows)
    # a rerun finds the manifest and returns without training
    again = pretrain(cfg, MODEL, train, heldout, tmp_path / "run", sink=MemorySink())
    assert again == res


def test_exact_resume(splits, tmp_path):
    train, heldout = splits
    cfg = CFG.derive(checkpoint_every=2)
    full = pretrain(cfg, MODEL, train, None, tmp_path / "full")
    part = pretrain(cfg, MODEL, train, None, tmp_path / "split", stop_after_steps=4)
    assert not part.completed and part.steps == 4 and Path(part.checkpoint_dir).name == "step_4"
    assert (Path(part.checkpoint_dir) / "model.safetensors").is_file()
    resumed = pretrain(cfg, MODEL, train, None, tmp_path / "split")
    assert resumed.steps == 8
    assert load_loss_history(tmp_path / "split") == load_loss_history(tmp_path / "full")
    assert resumed.final_loss == full.final_loss


def test_divergence_raises(splits, tmp_path):
    train, _ = splits
    with pytest.raises(DivergenceError, match="lr"):
        pretrain(CFG.derive(lr=1e30, warmup_steps=0, grad_clip=0.0, steps=4), MODEL, train, None, tmp_path / "x")


def test_ddp_two_processes_match_single_process(splits, tmp_path):
    train, _ = splits
    cfg = CFG.derive(steps=3, device="cpu")  # gloo: two processes need no GPUs (NCCL wants one each)
    single = pretrain(cfg, MODEL, train, None, tmp_path / "one")
    spec = tmp_path / "cfg.json"
    spec.write_text(json.dumps({"pretrain": cfg.model_dump(mode="json"), "model": MODEL.model_dump(mode="json")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tasks" / "torchrun_pretrain.py"), "--config", str(spec), "--data", str(train),
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_loss_history(tmp_path / "one"), load_loss_history(tmp_path / "two")
    assert len(two) == 3
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["steps"] == single.steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_gpu_mfu_report(splits, tmp_path):
    train, _ = splits
    cfg = PretrainConfig(steps=20, seq_len=256, batch_tokens=256 * 32, micro_batch_size=32, bf16=True, log_every=10,
                         device="cuda")
    res = pretrain(cfg, ModelConfig.from_flavour("small", max_seq_len=256), train, None, tmp_path / "gpu")
    print(f"GPU tokens/s {res.tokens_per_s:.0f} MFU {res.mfu:.3%}")  # noqa: T201 - reported by -s
    assert res.mfu > 0


def test_reader_accepts_the_tokenizer_stage_layout(tmp_path):
    split = write_split(tmp_path / "tok" / "train", [np.array([1, 2]), np.array([3, 4, 5])], ["x", "y"], 10)
    (split / "manifest.json").unlink()
    np.save(split / "doc_sources.npy", np.array([1, 0], dtype=np.int32))
    (split / "sources.json").write_text(json.dumps(["web", "code"]))
    (split / "shard.json").write_text(json.dumps({"dtype": "uint16"}))
    (tmp_path / "tok" / "manifest.json").write_text(json.dumps({"vocab_size": 300}))
    s = TokenSplit(split)
    assert s.vocab_size == 300 and s.sources.tolist() == ["code", "web"] and len(s) == 5
