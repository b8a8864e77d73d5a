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
    average_steps,
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


def test_linear_schedule_anneals_to_zero():
    assert lr_factor(0, 2, 12, 0.0, "linear") == pytest.approx(0.5)
    assert lr_factor(2, 2, 12, 0.0, "linear") == pytest.approx(1.0)
    assert lr_factor(7, 2, 12, 0.0, "linear") == pytest.approx(0.5)
    assert lr_factor(12, 2, 12, 0.0, "linear") == pytest.approx(0.0)
    assert average_steps(12, 3) == [4, 8, 12] and average_steps(2, 4) == [1, 2] and average_steps(12, 1) == []


def test_the_final_model_is_the_mean_of_the_snapshots_and_resumes(splits, tmp_path):
    """Annealing with checkpoint averaging (Llama 3): linear decay to 0, the final weights the mean of 3 snapshots
    (steps 4, 8, 12, each the weights then), the last weights' held-out loss reported beside the mean's; a run
    stopped between snapshots resumes to the same average."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    train, heldout = splits
    cfg = CFG.derive(steps=12, schedule="linear", min_lr_ratio=0.0, average_last=3, checkpoint_every=2)
    sink = MemorySink()
    res = pretrain(cfg, MODEL, train, heldout, tmp_path / "run", sink=sink)
    snaps = sorted((tmp_path / "run" / "average").glob("step-*.safetensors"))
    assert [f.name for f in snaps] == ["step-00000004.safetensors", "step-00000008.safetensors",
                                       "step-00000012.safetensors"]
    assert res.averaged == 3 and res.heldout_loss_last is not None and res.heldout_loss != res.heldout_loss_last
    final = LlamaForCausalLM.from_pretrained(res.model_dir).state_dict()
    parts = [load_file(str(f)) for f in snaps]
    for name, w in parts[0].items():
        torch.testing.assert_close(final[name], sum(p[name] for p in parts) / 3, rtol=1e-6, atol=1e-6)
    assert not torch.equal(parts[0][name], parts[2][name])  # the snapshots differ: the mean is not the last
    assert any("heldout_loss_last" in m for _, m in sink.rows)
    lrs = [m["lr"] for _, m in sink.rows if "lr" in m]
    assert lrs[-1] < lrs[2] / 5  # decayed linearly towards 0
    stopped = pretrain(cfg, MODEL, train, heldout, tmp_path / "again", stop_after_steps=6)
    assert not stopped.completed
    resumed = pretrain(cfg, MODEL, train, heldout, tmp_path / "again")
    assert resumed.heldout_loss == pytest.approx(res.heldout_loss, abs=1e-6)
    again = LlamaForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    torch.testing.assert_close(again[name], final[name], rtol=1e-6, atol=1e-6)


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


def _torchrun(cfg: PretrainConfig, train, heldout, out: Path, stop_after_steps: int | None = None) -> dict:
    """Two gloo processes (no GPUs needed) under torchrun; rank 0's result.json."""
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps({"pretrain": cfg.model_dump(mode="json"), "model": MODEL.model_dump(mode="json")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(ROOT / "tasks" / "torchrun_pretrain.py"), "--config", str(spec), "--data", str(train), "--out", str(out)]
    args += ["--heldout", str(heldout)] if heldout is not None else []
    args += ["--stop-after-steps", str(stop_after_steps)] if stop_after_steps else []
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_single_process(splits, tmp_path, parallelism):
    """DDP (replicated) and FSDP2 (sharded per decoder layer) on two processes: the one-process loss curve, held-out
    loss and final weights."""
    train, heldout = splits
    cfg = CFG.derive(steps=3, device="cpu")
    single = pretrain(cfg, MODEL, train, heldout, tmp_path / "one")
    two = _torchrun(cfg.derive(parallelism=parallelism), train, heldout, tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["parallelism"] == parallelism
    assert len(load_loss_history(tmp_path / "two")) == 3 and two["steps"] == single.steps
    np.testing.assert_allclose(load_loss_history(tmp_path / "two"), load_loss_history(tmp_path / "one"), atol=1e-5,
                               rtol=0)
    assert two["heldout_loss"] == pytest.approx(single.heldout_loss, abs=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" /
                                                                                  "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


def test_an_fsdp_checkpoint_resumes_in_one_process(splits, tmp_path):
    """Checkpoints hold whole (unsharded) weights and name-keyed optimizer state: a two-process FSDP run stopped
    after 2 of 5 steps finishes in one process on the uninterrupted curve."""
    train, _ = splits
    cfg = CFG.derive(steps=5, device="cpu")
    full = pretrain(cfg, MODEL, train, None, tmp_path / "full")
    part = _torchrun(cfg.derive(parallelism="fsdp"), train, None, tmp_path / "split", stop_after_steps=2)
    assert not part["completed"] and Path(part["checkpoint_dir"]).name == "step_2"
    resumed = pretrain(cfg, MODEL, train, None, tmp_path / "split")
    assert resumed.completed and resumed.steps == 5
    np.testing.assert_allclose(load_loss_history(tmp_path / "split"), load_loss_history(tmp_path / "full"),
                               atol=1e-4, rtol=0)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-4)


def test_fsdp_without_processes_names_the_fix(splits, tmp_path):
    train, _ = splits
    with pytest.raises(ConfigError, match="nproc to 2 or more"):
        pretrain(CFG.derive(parallelism="fsdp"), MODEL, train, None, tmp_path / "x")


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


def test_process_count_checks_name_the_fix(tmp_path):
    """`parallelism: fsdp` with one process, or a process count that does not divide the batch: one message each,
    naming the fields to change (a --config file is checked before anything runs)."""
    from stages.presets import load_section

    override = tmp_path / "p.yaml"
    override.write_text("nproc: 1\ntrain: {parallelism: fsdp}\n")
    with pytest.raises(ConfigError, match=r"pretraining: train.parallelism 'fsdp' .* set nproc to 2 or more") as e:
        load_section("pretraining", "tiny", override)
    assert "got" not in str(e.value)  # the section's whole value is not echoed
    override.write_text("nproc: 3\n")
    with pytest.raises(ConfigError, match=r"nproc 3 x train.micro_batch_size \d+ must divide the global batch"):
        load_section("pretraining", "tiny", override)
    override.write_text("nproc: 2\ntrain: {parallelism: fsdp, micro_batch_size: 4}\n")
    cfg = load_section("pretraining", "tiny", override)
    assert cfg.nproc == 2 and cfg.train.parallelism == "fsdp"


def test_activation_checkpointing_recomputes_the_same_curve(splits, tmp_path):
    train, _ = splits
    cfg = CFG.derive(steps=3, device="cpu")
    plain = pretrain(cfg, MODEL, train, None, tmp_path / "plain")
    ckpt = pretrain(cfg.derive(activation_checkpointing=True), MODEL, train, None, tmp_path / "ac")
    np.testing.assert_allclose(load_loss_history(tmp_path / "ac"), load_loss_history(tmp_path / "plain"), atol=1e-6,
                               rtol=0)
    assert ckpt.final_loss == pytest.approx(plain.final_loss, abs=1e-6)


def test_the_batch_size_ramp_doubles_the_batch_and_resumes_exactly_across_a_ramp_step(splits, tmp_path):
    """Llama 3's batch-size ramp: 256-token batches, 512 from 512 tokens seen, 1024 from 1536; stopped at the
    step before the first ramp step, the rerun resumes on the uninterrupted curve and token count."""
    train, _ = splits
    cfg = CFG.derive(steps=None, max_tokens=4096, batch_ramp=[(512, 512), (1536, 1024)])
    assert [cfg.batch_at(cfg.tokens_before(s)) for s in range(cfg.total_steps)] == [256, 256, 512, 512, 1024, 1024]
    assert cfg.total_steps == 6 and cfg.tokens_before(6) == 3584
    sink = MemorySink()
    full = pretrain(cfg, MODEL, train, None, tmp_path / "full", sink=sink)
    assert full.steps == 6 and full.tokens == 3584
    assert [m["tokens"] for _, m in sink.rows if "tokens" in m] == [
        256, 512, 1024, 1536, 2560, 3584]
    part = pretrain(cfg, MODEL, train, None, tmp_path / "split", stop_after_steps=2)
    assert not part.completed and part.tokens == 512
    resumed = pretrain(cfg, MODEL, train, None, tmp_path / "split")
    assert resumed.tokens == 3584 and load_loss_history(tmp_path / "split") == load_loss_history(tmp_path / "full")
    with pytest.raises(ValidationError, match=r"batch_ramp\[1\]"):
        CFG.derive(batch_ramp=[(512, 512), (256, 1024)])
    with pytest.raises(ValidationError, match=r"batch_ramp\[0\]: batch_tokens=96"):
        CFG.derive(batch_ramp=[(512, 96)])
