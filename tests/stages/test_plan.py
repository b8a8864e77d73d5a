"""`herd plan`: a pretraining run on paper, checked against hand-computed numbers for the 7B flavour and against
published facts (the parameter counts of Llama 2 7B and Llama 3 8B, Llama 2 7B's GPU hours)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.errors import ConfigError
from stages.plan import PlanConfig, plan

GIB = 1024**3


def test_7b_by_hand():
    """The 7b flavour (Llama 2 7B's shape with 8 KV heads), vocab 32k, seq 4096, 64 GPUs, FSDP, micro batch 1."""
    p = plan(PlanConfig(flavour="7b", vocab_size=32_000, seq_len=4096, nproc=64, parallelism="fsdp", gpu="H100",
                        mfu=0.4, tokens=2e12))
    dim, layers, kv_dim, hidden, vocab, seq = 4096, 32, 8 * 128, 11_008, 32_000, 4096  # hidden: 8/3 dim up to 256
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim  # q, o; k, v; SwiGLU; two norms
    assert layer == 177_217_536 and p["layer_params"] == layer
    params = layers * layer + dim + 2 * vocab * dim  # + final norm, embedding and untied head
    assert params == 5_933_109_248 and p["params"] == params
    # 16 bytes per parameter sharded over 64 GPUs, plus two gathered bf16 layers and the gathered embedding and head
    states = 16 * params / 64 + 2 * 2 * layer + 2 * 2 * vocab * dim
    assert p["model_states_gib"] * GIB == pytest.approx(states) and states == pytest.approx(2_716_435_456)
    per_token_layer = 2 * (6 * dim + 2 * kv_dim + 4 * hidden) + 4 * 32  # bf16 tensors + fp32 log-sum-exp per head
    assert p["activation_bytes_per_token_layer"] == per_token_layer == 141_440
    logits = 6 * vocab * seq  # bf16 logits and their fp32 copy for the loss
    full = layers * per_token_layer * seq + logits
    ckpt = layers * 2 * dim * seq + per_token_layer * seq + logits  # layer inputs + one layer recomputed
    assert p["no_checkpointing"]["activations_gib"] * GIB == pytest.approx(full) == 19_325_255_680
    assert p["checkpointing"]["activations_gib"] * GIB == pytest.approx(ckpt) == 2_439_512_064
    fpt = 6 * (params - 2 * vocab * dim + dim * vocab) + 12 * layers * dim * seq  # 6N (head counted) + attention
    assert p["flops_per_token"] == pytest.approx(fpt) == 41_254_674_432
    tps = 0.4 * 989e12 / fpt
    assert p["no_checkpointing"]["tokens_per_s_per_gpu"] == pytest.approx(tps)
    assert p["checkpointing"]["tokens_per_s_per_gpu"] == pytest.approx(tps * 3 / 4)  # the forward runs twice
    assert p["no_checkpointing"]["days"] == pytest.approx(2e12 / (tps * 64) / 86400) == pytest.approx(37.72, abs=0.01)
    assert p["no_checkpointing"]["fits"] and p["checkpointing"]["total_gib"] < p["no_checkpointing"]["total_gib"]


def test_published_models():
    # Llama 2 7B (multi-head attention, vocab 32k): 6,738,415,616 parameters; 2T tokens took 184,320 A100-80GB hours
    # (Llama 2 paper, Table 2), which is 44% MFU by the FLOPs per token the trainer reports MFU with
    llama2 = plan(PlanConfig(flavour="7b", n_kv_heads=32, vocab_size=32_000, seq_len=4096, nproc=64, gpu="A100",
                             mfu=0.44, tokens=2e12))
    assert llama2["params"] == 6_738_415_616
    assert llama2["no_checkpointing"]["days"] * 24 * 64 == pytest.approx(184_320, rel=0.02)
    # Llama 3 8B: 8,030,261,248 parameters; at 8K tokens its activations need checkpointing or sharding to fit
    llama3 = plan(PlanConfig(flavour="8b", seq_len=8192, nproc=8, parallelism="ddp"))
    assert llama3["params"] == 8_030_261_248
    assert llama3["model_states_gib"] == pytest.approx(16 * 8_030_261_248 / GIB)
    assert not llama3["no_checkpointing"]["fits"] and not llama3["checkpointing"]["fits"]  # 120 GiB of states
    sharded = plan(PlanConfig(flavour="8b", seq_len=8192, nproc=64, parallelism="fsdp"))
    assert sharded["checkpointing"]["fits"] and sharded["model_states_gib"] < 5


def test_bad_plans_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="parallelism: fsdp.*nproc"):
        PlanConfig(parallelism="fsdp", nproc=1)
    with pytest.raises(ConfigError, match="flavour: unknown model flavour '9b'"):
        PlanConfig(flavour="9b")
    res = subprocess.run([sys.executable, "-m", "herd.cli", "plan", "--nproc", "1"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: parallelism: fsdp shards over several GPUs; with nproc 1 use parallelism: ddp (or set nproc > 1)"]
    out = subprocess.run([sys.executable, "-m", "herd.cli", "plan", "--flavour", "8b", "--nproc", "64", "--seq-len",
                          "8192", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params"] == 8_030_261_248
