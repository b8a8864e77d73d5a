"""One device policy for every stage that runs a model (``stages.device``): the same fields and resolution
everywhere, ``cuda`` without a GPU refused, and each model-running stage run with an explicit device.

On a CPU, ``device: cpu`` with ``dtype: bfloat16`` takes the same code path as a GPU's default (weights of only-run
models cast, trained models in float32 under autocast), so CI checks that path without a GPU; the ``gpu`` test
runs the stages on CUDA where one is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.collect import CollectConfig, GenerationConfig, generate, load_policy
from stages.device import OnDevice, resolve_device, resolve_dtype
from stages.dpo import DPOConfig, dpo
from stages.errors import ConfigError
from stages.evaluate import EvalConfig, answer_logprobs
from stages.evaluation.harness import HarnessConfig
from stages.ppo import PPOConfig, ppo
from stages.preferences import ingest_file
from stages.pretrain import PretrainConfig
from stages.rejection import RejectionConfig
from stages.reward import RewardScorer, RMConfig, load_reward_model, score, train_reward_model
from tests.stages._policy import make_policy, one_thread

NO_GPU = not torch.cuda.is_available()
FACTS = ["The capital of France is Paris", "A spider has eight legs", "Water boils at one hundred degrees",
         "Shakespeare wrote Hamlet"]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return make_policy(tmp_path_factory.mktemp("device-policy"),
                       [f"Tell me a fact. {FACTS[i % len(FACTS)]}. Hope this helps! Go away now." for i in range(40)])


@pytest.fixture(scope="module")
def batch(policy_dir, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("device-prefs")
    rows = [{"id": f"r{i}", "prompt": f"Tell me a fact, number {i}.", "chosen": FACTS[i % 4] + ". Hope this helps!",
             "rejected": FACTS[(i + 1) % 4] + ". Go away now.", "edited": None,
             "rating": ("significantly_better", "better")[i % 2], "category": ("helpfulness", "safety")[i % 3 == 0],
             "annotator_id": "test"} for i in range(24)]
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(ingest_file(d / "prefs.jsonl", d / "batches", batch_id="w1")[1])


PROMPTS = [{"id": f"p{i}", "prompt": f"Tell me a fact, number {i}.", "category": "helpfulness" if i % 3 else "safety"}
           for i in range(8)]


def test_every_model_running_stage_takes_the_same_device_fields():
    for cfg in (CollectConfig, RejectionConfig, EvalConfig, RMConfig, DPOConfig, PPOConfig, HarnessConfig):
        assert issubclass(cfg, OnDevice), cfg
        c = cfg()
        assert (c.device, c.dtype) == ("auto", "auto")
        with pytest.raises(ValueError):
            cfg(device="tpu")
        with pytest.raises(ValueError):
            cfg(dtype="float16")
    assert PretrainConfig().device == "auto"
    with pytest.raises(ValueError):
        PretrainConfig(device="cuda:0")


def test_resolution_auto_cpu_and_cuda():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_GPU:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device is visible; use 'auto' or 'cpu'"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="no CUDA device"):
            DPOConfig(device="cuda").torch_device()
    else:
        assert resolve_device("auto").type == "cuda" and resolve_device("cuda", rank=1).type == "cuda"


@pytest.mark.skipif(not NO_GPU, reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error_in_every_stage(policy_dir, batch, tmp_path):
    from stages.model import ModelConfig
    from stages.pretrain import pretrain
    from tests.stages._tokens import random_split

    with pytest.raises(ConfigError, match="no CUDA device"):
        dpo(DPOConfig(device="cuda"), policy_dir, [batch], tmp_path / "dpo")
    with pytest.raises(ConfigError, match="no CUDA device"):
        train_reward_model(RMConfig(device="cuda"), policy_dir, [batch], tmp_path / "rm")
    with pytest.raises(ConfigError, match="no CUDA device"):
        ppo(PPOConfig(device="cuda"), policy_dir, lambda p, r, c: np.ones(len(r)), PROMPTS, tmp_path / "ppo")
    split = random_split(tmp_path / "tok", 20, seed=0)
    with pytest.raises(ConfigError, match="no CUDA device"):  # was a ZeroDivisionError (rank % 0 GPUs)
        pretrain(PretrainConfig(device="cuda", steps=1, seq_len=16, batch_tokens=32, micro_batch_size=2),
                 ModelConfig.from_flavour("debug"), split, None, tmp_path / "pt")


def _weights_dtypes(model_dir: str) -> set[torch.dtype]:
    return {t.dtype for t in load_file(Path(model_dir) / "model.safetensors").values()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stages_run_on_an_explicit_device(policy_dir, batch, tmp_path, dtype):
    """Generation, scoring, RM training, DPO and PPO with ``device: cpu`` given explicitly; in bfloat16 (the GPU
    default's path) only-run models are cast, trained ones keep float32 weights, and the numbers stay finite."""
    on = OnDevice(device="cpu", dtype=dtype)
    dt = resolve_dtype(dtype, torch.device("cpu"))
    model, tok = load_policy(policy_dir, on)
    assert next(model.parameters()).dtype == dt
    texts, stats = generate(model, tok, [p["prompt"] for p in PROMPTS], temperature=1.0,
                            cfg=GenerationConfig(max_new_tokens=6, batch_size=4))
    assert len(texts) == len(PROMPTS) and stats["tokens"] > 0
    lp, ent = answer_logprobs(policy_dir, [{"prompt": "Hi", "answers": ["Paris.", "Hope this helps!"]}], 64, on=on)
    assert len(lp) == 2 and all(np.isfinite(x).all() for x in lp + ent)

    rm = train_reward_model(RMConfig(device="cpu", dtype=dtype, batch_pairs=8, micro_pairs=4, lr=1e-4,
                                     max_tokens=64, heldout_fraction=0.2), policy_dir, [batch], tmp_path / "rm")
    assert math.isfinite(rm.final_loss) and _weights_dtypes(rm.model_dir) == {torch.float32}
    rm_model, rm_tok = load_reward_model(rm.model_dir, on=on)
    assert next(rm_model.parameters()).dtype == dt
    assert np.isfinite(score(rm_model, rm_tok, ["Hi"], ["Paris."])).all()
    scorer = RewardScorer(rm.model_dir, rm.model_dir, on=on)
    assert ((0 < scorer(["Hi"], ["Paris."], ["safety"])) & (scorer(["Hi"], ["Paris."], ["safety"]) < 1)).all()

    d = dpo(DPOConfig(device="cpu", dtype=dtype, lr=1e-4, batch_pairs=8, micro_pairs=4, max_tokens=64), policy_dir,
            [batch], tmp_path / "dpo")
    assert all(math.isfinite(v) for v in d.metrics.values()) and _weights_dtypes(d.model_dir) == {torch.float32}

    p = ppo(PPOConfig(device="cpu", dtype=dtype, iterations=2, prompts_per_iteration=4, minibatch_size=2, lr=1e-4,
                      max_new_tokens=6, max_prompt_tokens=64), policy_dir, scorer, PROMPTS, tmp_path / "ppo",
            value_init_dir=rm.model_dir)
    assert all(math.isfinite(v) for v in p.metrics.values()) and _weights_dtypes(p.model_dir) == {torch.float32}


def test_auto_is_the_explicit_device_it_resolves_to(policy_dir, batch, tmp_path):
    """`auto` is nothing but its resolution: cpu/float32 here, cuda/bfloat16 on a GPU machine."""
    cfg = DPOConfig(lr=1e-4, batch_pairs=8, micro_pairs=4, max_tokens=64)
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    assert (device.type, dtype) == (("cpu", torch.float32) if NO_GPU else ("cuda", torch.bfloat16))
    auto = dpo(cfg, policy_dir, [batch], tmp_path / "auto")
    explicit = dpo(cfg.derive(device=device.type, dtype=str(dtype).removeprefix("torch.")), policy_dir, [batch],
                   tmp_path / "explicit")
    assert auto.metrics == explicit.metrics


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_stages_on_cuda(policy_dir, batch, tmp_path):
    on = OnDevice(device="cuda")
    model, tok = load_policy(policy_dir, on)
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    texts, _ = generate(model, tok, [p["prompt"] for p in PROMPTS], temperature=1.0,
                        cfg=GenerationConfig(max_new_tokens=6, batch_size=4))
    assert len(texts) == len(PROMPTS)
    rm = train_reward_model(RMConfig(device="cuda", batch_pairs=8, micro_pairs=4, lr=1e-4, max_tokens=64),
                            policy_dir, [batch], tmp_path / "rm")
    d = dpo(DPOConfig(device="cuda", lr=1e-4, batch_pairs=8, micro_pairs=4, max_tokens=64), policy_dir, [batch],
            tmp_path / "dpo")
    p = ppo(PPOConfig(device="cuda", iterations=2, prompts_per_iteration=4, minibatch_size=2, lr=1e-4,
                      max_new_tokens=6, max_prompt_tokens=64), policy_dir, RewardScorer(rm.model_dir, rm.model_dir, on=on),
            PROMPTS, tmp_path / "ppo")
    for res in (d, p):
        assert all(math.isfinite(v) for v in res.metrics.values())


_FAULTS = """
import resource, sys
import torch
import torch.nn.functional as F
from stages.device import resolve_device
if sys.argv[1] == "tuned":
    resolve_device("cpu")  # a CPU stage's first step tunes the allocator
g, u = torch.ones(8192, 1536), torch.ones(8192, 1536)  # an MLP's gate and up activations, 48 MB each
for _ in range(20):  # warm up: the heap settles
    y = F.silu(g) * u; del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = F.silu(g) * u; del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="page-fault counts are read on Linux")
def test_a_cpu_stage_reuses_freed_tensor_memory_instead_of_faulting_in_fresh_pages():
    """glibc serves every 48 MB activation from fresh mmap pages and unmaps them on free: SiLU(gate) x up faults
    in 2 x 12k pages per call, for ever. Once a stage has resolved the CPU, the freed memory is reused: after a
    warm-up, no faults."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=root, capture_output=True, text=True,
                                       check=True, timeout=120).stdout.strip()) for mode in ("default", "tuned")}
    assert faults["default"] > 5 * 2 * 12_000, faults
    assert faults["tuned"] < 1_000, faults
