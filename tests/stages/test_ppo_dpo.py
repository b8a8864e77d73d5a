"""PPO and DPO on a tiny policy: rollouts line up with generation, the reward goes up under PPO, DPO
prefers the chosen pattern afterwards, formatting tokens stay out of the DPO term, reruns are cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.collect import load_policy
from stages.common import MemorySink
from stages.dpo import DPOConfig, dpo, formatting_ids, logps, response_tokens
from stages.ppo import PPOConfig, Rollout, policy_logps, ppo, rollout, stop_ids, value_model
from stages.preferences import ingest_file
from tests.stages._policy import make_policy, one_thread

FACTS = ["The capital of France is Paris", "A spider has eight legs", "Water boils at one hundred degrees",
         "Shakespeare wrote Hamlet", "Jupiter is the largest planet", "The sky is blue on a clear day",
         "Two plus two is four", "Mercury is closest to the sun"]
GOOD, BAD = " Hope this helps!", " Go away now."


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A random-init debug Llama on a 300-token BPE, saved as a policy folder."""
    return make_policy(tmp_path_factory.mktemp("rl-policy"), [f"Tell me a fact. {FACTS[i % len(FACTS)]}.{GOOD}{BAD}" for i in range(60)])


# ------------------------------------------------------------------ PPO


def _e_share(prompts, responses, categories) -> np.ndarray:
    """Rule reward in (0, 1): the share of the response's characters that are the letter 'e'."""
    return np.array([0.05 + 0.9 * sum(c == "e" for c in r) / max(1, len(r)) for r in responses])


PROMPTS = [{"id": f"p{i}", "prompt": f"Tell me a fact, number {i}.", "category": "helpfulness" if i % 4 else "safety"}
           for i in range(16)]


def test_rollout_log_probs_match_generation(policy_dir):
    model, tok = load_policy(policy_dir)
    torch.manual_seed(0)
    ro = rollout(model, tok, ["Hi", "Tell me a fact about the sky, please."], temperature=1.0, max_new_tokens=8,
                 max_prompt_tokens=64, batch_size=2)
    assert ro.prompt_ids.shape[0] == 2 and ro.response_ids.shape == ro.response_mask.shape
    assert ro.prompt_mask[0, 0] == 0 and ro.prompt_mask[:, -1].all()  # left padding
    stop = stop_ids(tok)
    for row, m in zip(ro.response_ids.tolist(), ro.response_mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n) and 1 <= n <= 8
        assert not any(t in stop for t in row[:n - 1])  # a stop token can only be the last scored token
    # the per-token log-probs of a forward pass equal the sampling distribution of generate (KV cache, padding)
    prompt = ro.prompt_ids[:1, :]
    torch.manual_seed(1)
    out = model.generate(input_ids=prompt, attention_mask=ro.prompt_mask[:1], do_sample=True, top_k=0, top_p=1.0,
                         max_new_tokens=6, eos_token_id=stop, pad_token_id=tok.pad_token_id, use_cache=True,
                         output_scores=True, return_dict_in_generate=True)
    resp = out.sequences[:, prompt.shape[1]:]
    gen_logp = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logp, entropy = policy_logps(model, Rollout(prompt, ro.prompt_mask[:1], resp, torch.ones_like(resp), [""], 0.0),
                                     1.0)
    assert torch.allclose(logp, gen_logp, atol=1e-4)
    assert (entropy > 0).all() and (entropy <= math.log(model.config.vocab_size) + 1e-4).all()


def test_ppo_raises_the_reward_and_caches(policy_dir, tmp_path):
    cfg = PPOConfig(iterations=15, prompts_per_iteration=24, minibatch_size=8, lr=3e-3, max_new_tokens=12,
                    max_prompt_tokens=64, rollout_batch_size=24, num_threads=1)
    sink = MemorySink()
    res = ppo(cfg, policy_dir, _e_share, PROMPTS, tmp_path / "ppo", sink=sink)
    hist = json.loads((tmp_path / "ppo" / "metrics.json").read_text())["history"]
    rewards = [h["reward"] for h in hist]
    assert len(hist) == 15 and [s for s, _ in sink.rows] == list(range(1, 16))
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1  # the share of 'e' clearly went up
    assert 0 < res.metrics["kl_last"] < 1e3 and math.isfinite(res.metrics["kl_last"])
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout is from the reference itself
    for key in ("policy_loss", "value_loss", "clipfrac", "entropy", "response_length", "tokens_per_s"):
        assert all(math.isfinite(h[key]) for h in hist), key
    assert res.algorithm == "ppo" and res.parent_dir == str(policy_dir)
    assert res.metrics["reward_first"] == rewards[0] and res.metrics["reward_last"] == rewards[-1]
    model, _ = load_policy(res.model_dir)  # a plain causal LM: the value model is not saved with it
    assert not any("score" in k or "trunk" in k for k in model.state_dict())
    assert json.loads((tmp_path / "ppo" / "manifest.json").read_text())["stage"] == "ppo"

    def boom(*a):
        raise AssertionError("a complete manifest must be reused")

    assert ppo(cfg, policy_dir, boom, PROMPTS, tmp_path / "ppo") == res


def test_ppo_value_function_from_a_reward_model(policy_dir, tmp_path):
    from stages.reward import load_reward_model

    rm, tok = load_reward_model(policy_dir, from_causal_lm=True, seed=3)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    policy, _ = load_policy(policy_dir)
    v = value_model(policy, value_init_dir=tmp_path / "rm")
    assert torch.equal(v.head.weight, rm.score.weight)
    assert torch.equal(v.trunk.embed_tokens.weight, rm.model.embed_tokens.weight)
    cfg = PPOConfig(iterations=2, prompts_per_iteration=4, minibatch_size=2, lr=1e-4, max_new_tokens=6,
                    max_prompt_tokens=64, num_threads=1)
    res = ppo(cfg, policy_dir, _e_share, PROMPTS, tmp_path / "ppo", value_init_dir=tmp_path / "rm")
    assert res.metrics["iterations"] == 2 and math.isfinite(res.metrics["kl_last"])
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["manifest.json", "metrics.json", "model"]


# ------------------------------------------------------------------ DPO


def test_dpo_mask_excludes_formatting_tokens(policy_dir):
    _, tok = load_policy(policy_dir)
    fmt = formatting_ids(tok)
    names = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    assert {tok.convert_ids_to_tokens(i) for i in fmt} == names
    ids, mask = response_tokens(tok, "Tell me a fact.", FACTS[0] + GOOD, 256, fmt)
    _, raw = response_tokens(tok, "Tell me a fact.", FACTS[0] + GOOD, 256)
    assert len(ids) == len(mask) == len(raw)
    assert tok.decode([i for i, m in zip(ids, raw) if m]) == FACTS[0] + GOOD + "<|eot_id|>"  # assistant span
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == FACTS[0] + GOOD  # minus end of turn
    assert all(m == 0 for i, m in zip(ids, mask) if i in fmt)
    assert any(i in fmt for i in ids)  # headers and end of turn are there, just not scored
    # a multi-turn prompt's earlier assistant turn is context, not scored
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away now."},
             {"role": "user", "content": "Tell me a fact."}]
    ids2, mask2 = response_tokens(tok, convo, FACTS[1], 256, fmt)
    assert tok.decode([i for i, m in zip(ids2, mask2) if m]) == FACTS[1]


def _prefs(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"Tell me a fact, number {i}.", "chosen": FACTS[i % len(FACTS)] + "." + GOOD,
             "rejected": FACTS[(i + 3) % len(FACTS)] + "." + BAD, "edited": None, "rating": "better",
             "category": "helpfulness", "annotator_id": "test"} for i in range(start, start + n)]


def _margins(model_dir, pad_pairs) -> torch.Tensor:
    model, tok = load_policy(model_dir)
    fmt = formatting_ids(tok)
    c = [response_tokens(tok, p["prompt"], p["chosen"], 128, fmt) for p in pad_pairs]
    r = [response_tokens(tok, p["prompt"], p["rejected"], 128, fmt) for p in pad_pairs]
    with torch.no_grad():
        return logps(model, c, tok.pad_token_id)[0] - logps(model, r, tok.pad_token_id)[0]


def test_dpo_learns_to_prefer_the_chosen_pattern(policy_dir, tmp_path):
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _prefs(32)))
    _, batch = ingest_file(src, tmp_path / "prefs", batch_id="w1")
    cfg = DPOConfig(lr=1e-3, epochs=3, batch_pairs=8, micro_pairs=8, max_tokens=128, num_threads=1)
    sink = MemorySink()
    res = dpo(cfg, policy_dir, [batch], tmp_path / "dpo", sink=sink)
    assert res.algorithm == "dpo" and res.metrics["pairs"] == 32 and res.metrics["steps"] == 12
    hist = json.loads((tmp_path / "dpo" / "metrics.json").read_text())["history"]
    assert hist[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert hist[-1]["loss"] < hist[0]["loss"] and res.metrics["reward_accuracy_last"] >= 0.9
    # held-out prompts with the same pattern: chosen over rejected, before vs after (saved model)
    held = _prefs(16, start=100)
    before, after = _margins(policy_dir, held), _margins(res.model_dir, held)
    assert float((after - before).mean()) > 5.0
    assert float(((after - before) > 0).float().mean()) >= 0.9  # implicit reward accuracy (ref = the start)
    assert dpo(cfg, policy_dir, [], tmp_path / "dpo") == res  # cached: no batches needed


def test_dpo_config_validates_kinds_and_uses_last_batches(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        DPOConfig(kinds=("chosen>edited",))
    src1, src2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    src1.write_text("".join(json.dumps(r) + "\n" for r in _prefs(4)))
    src2.write_text("".join(json.dumps(r) + "\n" for r in _prefs(2, start=50)))
    _, b1 = ingest_file(src1, tmp_path / "prefs", batch_id="w1")
    _, b2 = ingest_file(src2, tmp_path / "prefs", batch_id="w2")
    cfg = DPOConfig(lr=1e-5, batch_pairs=2, micro_pairs=2, max_tokens=64, last_batches=1, num_threads=1)
    res = dpo(cfg, policy_dir, [b1, b2], tmp_path / "dpo")
    assert res.metrics["pairs"] == 2
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["batches"] == [str(b2)]


def test_dpo_reference_log_probs_are_cached_per_batch_by_content(policy_dir, tmp_path):
    src1, src2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    src1.write_text("".join(json.dumps(r) + "\n" for r in _prefs(6)))
    src2.write_text("".join(json.dumps(r) + "\n" for r in _prefs(4, start=50)))
    _, b1 = ingest_file(src1, tmp_path / "prefs", batch_id="w1")
    _, b2 = ingest_file(src2, tmp_path / "prefs", batch_id="w2")
    cfg = DPOConfig(lr=1e-4, batch_pairs=4, micro_pairs=2, max_tokens=64, num_threads=1)
    cache = tmp_path / "ref"
    plain = dpo(cfg, policy_dir, [b1, b2], tmp_path / "plain")
    first = dpo(cfg, policy_dir, [b1, b2], tmp_path / "first", ref_cache=cache)
    assert first.metrics == plain.metrics  # the cache changes nothing
    files = sorted(cache.glob("*/logps.npz"))
    assert len(files) == 2  # one per batch
    assert sorted(len(np.load(f)["chosen"]) for f in files) == [4, 6]
    # another config on the same policy and batches reads them: prove it by planting other values
    for f in files:
        n = len(np.load(f)["chosen"])
        np.savez(f, chosen=np.full(n, -1.0, dtype=np.float32), rejected=np.full(n, -50.0, dtype=np.float32))
    again = dpo(cfg.derive(lr=2e-4), policy_dir, [b1, b2], tmp_path / "again", ref_cache=cache)
    hist = json.loads((tmp_path / "again" / "metrics.json").read_text())["history"]
    assert hist[0]["reward_margin"] < -1.0  # the planted reference, not the policy itself (margin ~0)
    assert again.metrics["pairs"] == 10 and sorted(cache.glob("*/logps.npz")) == files
    assert dpo(cfg.derive(max_tokens=48), policy_dir, [b1, b2], tmp_path / "other", ref_cache=cache).metrics
    assert len(list(cache.glob("*/logps.npz"))) == 4  # max_tokens changes the tokens: new entries


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_dpo_two_processes_match_one_process(policy_dir, tmp_path, parallelism):
    """DPO in two gloo processes under torchrun (DDP, or FSDP2 sharded per decoder layer): the reference log-probs
    a share per process, then half of every step's pairs each, in micro-batches of 2 (a filler piece in the short
    last step): the one-process history and weights; rank 0 writes the policy folder and the reference cache."""
    from safetensors.torch import load_file

    from tasks.torchrun_stage import launch

    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _prefs(20)))
    _, batch = ingest_file(src, tmp_path / "prefs", batch_id="w1")
    cfg = DPOConfig(lr=1e-3, batch_pairs=8, micro_pairs=8, max_tokens=64, num_threads=1, device="cpu")
    one = dpo(cfg, policy_dir, [batch], tmp_path / "one")
    two = launch("dpo", cfg.derive(nproc=2, micro_pairs=2, parallelism=parallelism),
                 {"policy_dir": str(policy_dir), "batch_dirs": [str(batch)], "out_dir": str(tmp_path / "two"),
                  "ref_cache": str(tmp_path / "ref")}, 2, timeout=300)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["parallelism"] == parallelism
    h1, h2 = (json.loads((tmp_path / r / "metrics.json").read_text())["history"] for r in ("one", "two"))
    assert len(h1) == len(h2) == 3  # 8 + 8 + 4 pairs
    for key in ("loss", "reward_margin", "chosen_nll", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in h2], [h[key] for h in h1], atol=1e-4, rtol=0, err_msg=key)
    assert [h["reward_accuracy"] for h in h2] == [h["reward_accuracy"] for h in h1]
    a, b = load_file(Path(one.model_dir) / "model.safetensors"), load_file(Path(two["model_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
    assert (Path(two["model_dir"]) / "tokenizer.json").is_file() and len(list((tmp_path / "ref").glob("*/logps.npz"))) == 1


def test_dpo_process_checks_name_the_fix(policy_dir, tmp_path):
    from stages.errors import ConfigError

    with pytest.raises(ValueError, match="parallelism 'fsdp' shards the model over several processes: set nproc"):
        DPOConfig(parallelism="fsdp")
    with pytest.raises(ValueError, match="nproc 4 exceeds batch_pairs 2"):
        DPOConfig(nproc=4, batch_pairs=2)
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _prefs(2)))
    _, batch = ingest_file(src, tmp_path / "prefs", batch_id="w1")
    with pytest.raises(ConfigError, match="set alignment.dpo.nproc to 2 or more"):  # nproc 2 but no torchrun launch
        dpo(DPOConfig(nproc=2, parallelism="fsdp", device="cpu"), policy_dir, [batch], tmp_path / "dpo")
