"""PPO against the reward models (Llama 2, section 3.2.3).

Each iteration samples one response per prompt from the current policy (batched, left-padded, KV
cache, stopping at end of turn), scores the texts with the :data:`~stages.policy.RewardFn`
(probabilities in (0, 1)), turns the scores into Llama 2's final reward ``whiten(logit(score))``,
and spreads it over the response tokens with a per-token KL penalty ``-beta (log pi - log pi_0)``
against the frozen initial policy ``pi_0``. A value function (initialised from a reward model when
one is given, else a new head on a copy of the policy trunk) gives per-token values; advantages come
from GAE (gamma 1, lambda 0.95) and are whitened over the batch. Updates: the clipped surrogate plus
``vf_coef`` times the clipped value loss, AdamW (0.9, 0.95, eps 1e-5, weight decay 0.1), gradient
clipping 1.0, constant learning rate 1e-6, one gradient step per minibatch of 64 out of 512 prompts.

Outputs ``out_dir/``: ``model/`` (the new policy, :func:`stages.policy.save_policy`; the value model is
not saved), ``metrics.json`` (per-iteration history) and ``manifest.json`` (last). A complete manifest
means the stage already ran: its result is returned.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from stages.common import NULL_SINK, MetricsSink, read_manifest, write_json_atomic
from stages.device import OnDevice, autocast, model_device
from stages.errors import ConfigError, DataValidationError, DivergenceError
from stages.losses import gae, masked_mean, ppo_policy_loss, token_rewards, value_loss, whiten, whitened_reward
from stages.policy import PolicyResult, RewardFn, chat_prompt_ids, save_policy

log = logging.getLogger(__name__)


class PPOConfig(OnDevice):
    """PPO hyperparameters; defaults are Llama 2's (section 3.2.3) where the paper states them."""

    iterations: int = Field(200, ge=1, description="PPO iterations, one rollout batch each (Llama 2: 200-400)")
    prompts_per_iteration: int = Field(512, ge=1, description="prompts sampled per iteration (Llama 2: batch 512)")
    minibatch_size: int = Field(64, ge=1, description="sequences per gradient step (Llama 2: PPO minibatch 64, one "
                                "gradient step per minibatch)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch (Llama 2: 1, i.e. 512/64 = 8 steps)")
    lr: float = Field(1e-6, gt=0, description="constant learning rate of policy and value model (Llama 2: 1e-6)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (Llama 2: 0.1)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (Llama 2: 0.9, 0.95)")
    eps: float = Field(1e-5, gt=0, description="AdamW epsilon (Llama 2: 1e-5)")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip, 0 = off (Llama 2: 1.0)")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon (Llama 2: 0.2)")
    kl_beta: float = Field(0.01, ge=0, description="per-token KL penalty against the initial policy (Llama 2: 0.01 "
                           "for 7B/13B, 0.005 for 34B/70B)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (Llama 2: 1)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Llama 2: 0.95)")
    vf_coef: float = Field(0.1, ge=0, description="value-loss weight in the total loss (not stated by Llama 2; "
                           "0.1 as in common PPO-for-LM implementations)")
    value_clip: float = Field(0.2, gt=0, description="clip of the value update around the rollout values (not "
                              "stated by Llama 2)")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature; log-probs use the same "
                               "temperature (Llama 2 samples RLHF rollouts at 1.0)")
    max_new_tokens: int = Field(256, ge=1, description="response tokens per rollout (not stated by Llama 2)")
    max_prompt_tokens: int = Field(256, ge=8, description="longer prompts keep their last tokens")
    rollout_batch_size: int = Field(64, ge=1, description="prompts per generate call (left-padded, KV cache)")
    num_threads: int = Field(0, ge=0, description="torch threads (0: leave the default)")
    seed: int = Field(0, description="prompt order, sampling and value-head init")


# ---------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Sampled responses, token-aligned. B sequences, P prompt positions (left-padded), T response positions.

    ``response_mask`` is 1 on each response's tokens through its first stop token (end of turn or eos:
    stopping is an action the policy is credited for), 0 on the right padding after it.
    """

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    texts: list[str]
    seconds: float

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       [self.texts[i] for i in idx.tolist()], self.seconds)


def stop_ids(tok) -> list[int]:
    """End of turn (``<|eot_id|>``, herd's template) and eos: the tokens that end a response."""
    eot = tok.get_vocab().get("<|eot_id|>")
    return [t for t in dict.fromkeys((eot, tok.eos_token_id)) if t is not None and t >= 0]


@torch.no_grad()
def rollout(model, tok, prompts: Sequence[str | list[dict]], *, temperature: float, max_new_tokens: int,
            max_prompt_tokens: int, batch_size: int) -> Rollout:
    """One sampled response per prompt (pure sampling: no top-k/top-p, so the log-probs are the policy's).

    Generates in chunks of ``batch_size`` with left padding and the KV cache, then packs every chunk
    into one :class:`Rollout` (prompts left-padded to the widest, responses right-padded).
    """
    stop = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    device = model_device(model)
    was_training = model.training
    model.eval()
    prompt_rows: list[list[int]] = []
    response_rows: list[list[int]] = []
    texts: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids = [chat_prompt_ids(tok, p, max_prompt_tokens) for p in prompts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=pad, use_cache=True)
        for p, row in zip(ids, out[:, width:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stop), None)
            resp = row if cut is None else row[:cut + 1]
            prompt_rows.append(p)
            response_rows.append(resp)
            texts.append(tok.decode(resp[:cut] if cut is not None else resp, skip_special_tokens=True).strip())
    seconds = time.perf_counter() - t0
    model.train(was_training)
    width = max(len(p) for p in prompt_rows)
    length = max(len(r) for r in response_rows)
    return Rollout(
        prompt_ids=torch.tensor([[pad] * (width - len(p)) + p for p in prompt_rows], device=device),
        prompt_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_rows], device=device),
        response_ids=torch.tensor([r + [pad] * (length - len(r)) for r in response_rows], device=device),
        response_mask=torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in response_rows], device=device),
        texts=texts, seconds=seconds)


def response_hidden(trunk, batch: Rollout) -> torch.Tensor:
    """Hidden states (B, T, H) at the positions that predict each response token (the last prompt token
    predicts the first). Positions count real tokens only, as in generation with left padding."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    h = trunk(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    return h[:, p - 1:p - 1 + t]


def policy_logps(model, batch: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(y_t), entropy_t)`` of the response tokens under ``model`` (a ``LlamaForCausalLM``), (B, T) each;
    the entropy is detached (a diagnostic, not part of the loss)."""
    logits = model.lm_head(response_hidden(model.model, batch)).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class ValueModel(torch.nn.Module):
    """A Llama trunk and a scalar head applied at every position: V(s_t) per response token."""

    def __init__(self, trunk: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, batch: Rollout) -> torch.Tensor:
        return self.head(response_hidden(self.trunk, batch)).squeeze(-1).float()


def value_model(policy, *, value_init_dir: str | Path | None = None, seed: int = 0) -> ValueModel:
    """The value function: a saved reward model's trunk and ``score`` head (``value_init_dir``), else a
    zero-initialised head on a copy of the policy trunk; on the policy's device, float32 (it is trained)."""
    device = model_device(policy)
    if value_init_dir is not None:
        from stages.reward import load_reward_model

        rm, _ = load_reward_model(value_init_dir)
        rm = rm.to(device)
        if rm.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"value_init_dir: the reward model in {value_init_dir} has vocabulary size "
                              f"{rm.config.vocab_size}, the policy {policy.config.vocab_size}; initialise the value "
                              "function from an RM trained on the policy's tokenizer, or pass none")
        return ValueModel(rm.model, rm.score)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(head.weight)
    return ValueModel(copy.deepcopy(policy.model), head.to(device))


def _prompt_stream(prompts: Sequence[dict], seed: int) -> Iterator[dict]:
    """The prompts forever: one seeded shuffle per pass."""
    order = sorted(prompts, key=lambda p: str(p["id"]))
    n = 0
    while True:
        rng = random.Random(f"ppo/{seed}/{n}")
        batch = list(order)
        rng.shuffle(batch)
        yield from batch
        n += 1


def _param_groups(modules: Sequence[torch.nn.Module], weight_decay: float) -> list[dict]:
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- stage


def ppo(cfg: PPOConfig, policy_dir: str | Path, reward_fn: RewardFn, prompts: Sequence[dict], out_dir: str | Path,
        *, value_init_dir: str | Path | None = None, sink: MetricsSink = NULL_SINK) -> PolicyResult:
    """Optimise the policy in ``policy_dir`` against ``reward_fn`` with PPO; write ``out_dir/model``.

    ``prompts``: ``{"id", "prompt", "category"}`` (category helpfulness | safety), cycled in a seeded order,
    ``cfg.prompts_per_iteration`` per iteration. ``value_init_dir``: a saved reward model folder to
    initialise the value function from (Llama 2 initialises it from the RM).
    """
    from stages.collect import load_policy

    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return PolicyResult.model_validate(done["result"])
    if not prompts:
        raise DataValidationError("no prompts to optimise on", field="prompts")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    policy, tok = load_policy(policy_dir, cfg, train=True)  # float32 weights on cfg's device, forwards in its dtype
    ref, _ = load_policy(policy_dir, cfg)  # only run: cast to cfg's dtype
    ref.requires_grad_(False)
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    values = value_model(policy, value_init_dir=value_init_dir, seed=cfg.seed)
    opt = torch.optim.AdamW(_param_groups([policy, values], cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps)
    params = [p for g in opt.param_groups for p in g["params"]]
    stream = _prompt_stream(prompts, cfg.seed)
    history: list[dict[str, float]] = []

    for it in range(cfg.iterations):
        drawn = [next(stream) for _ in range(cfg.prompts_per_iteration)]
        batch = rollout(policy, tok, [p["prompt"] for p in drawn], temperature=cfg.temperature,
                        max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
                        batch_size=cfg.rollout_batch_size)
        scores = np.asarray(reward_fn([p["prompt"] for p in drawn], batch.texts, [p["category"] for p in drawn]),
                            dtype=np.float64).reshape(len(drawn))
        mask = batch.response_mask.float()
        with torch.no_grad(), autocast(device, dtype):
            policy.eval()
            values.eval()
            old_logp, entropy = policy_logps(policy, batch, cfg.temperature)
            ref_logp, _ = policy_logps(ref, batch, cfg.temperature)
            old_values = values(batch) * mask
            rewards = token_rewards(whitened_reward(torch.from_numpy(scores).float().to(device)), old_logp, ref_logp,
                                    mask, cfg.kl_beta)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = whiten(adv, mask) * mask
            kl = ((old_logp - ref_logp) * mask).sum(dim=1).mean()

        policy.train()
        values.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "grad_norm": [],
                                         "approx_kl": []}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(batch))
            for i in range(0, len(batch), cfg.minibatch_size):
                idx = perm[i:i + cfg.minibatch_size]
                mb, m = batch.select(idx), mask[idx]
                width = int(m.sum(dim=0).nonzero().max()) + 1  # drop all-padding response columns
                mb.response_ids, mb.response_mask, m = mb.response_ids[:, :width], mb.response_mask[:, :width], \
                    m[:, :width]
                with autocast(device, dtype):
                    logp, _ = policy_logps(policy, mb, cfg.temperature)
                    new_values = values(mb)
                pl, clipfrac = ppo_policy_loss(logp, old_logp[idx, :width], adv[idx, :width], m, cfg.clip)
                vl = value_loss(new_values, old_values[idx, :width], returns[idx, :width], m, cfg.value_clip)
                loss = pl + cfg.vf_coef * vl
                if not torch.isfinite(loss):
                    raise DivergenceError(f"PPO loss became {float(loss)} at iteration {it + 1}; lower lr "
                                          f"(now {cfg.lr}) or raise grad_clip")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                opt.step()
                stats["policy_loss"].append(float(pl.detach()))
                stats["value_loss"].append(float(vl.detach()))
                stats["clipfrac"].append(float(clipfrac))
                stats["grad_norm"].append(float(gnorm))
                stats["approx_kl"].append(float(masked_mean(old_logp[idx, :width] - logp.detach(), m)))

        n_tokens = float(mask.sum())
        row = {"reward": float(scores.mean()), "kl": float(kl), "entropy": float(masked_mean(entropy, mask)),
               "response_length": n_tokens / len(batch), "tokens_per_s": n_tokens / max(batch.seconds, 1e-9),
               **{k: float(np.mean(v)) for k, v in stats.items()}}
        history.append(row)
        sink.log_metrics(row, it + 1)
        log.info("PPO %d/%d: reward %.3f, KL %.3f, policy loss %.4f, value loss %.4f, clipfrac %.3f, length %.1f",
                 it + 1, cfg.iterations, row["reward"], row["kl"], row["policy_loss"], row["value_loss"],
                 row["clipfrac"], row["response_length"])

    first, last = history[0], history[-1]
    metrics = {"iterations": float(len(history)), "reward_first": first["reward"], "reward_last": last["reward"],
               "kl_last": last["kl"], "entropy_last": last["entropy"], "response_length_last": last["response_length"],
               "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history]))}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise DivergenceError(f"PPO ended with non-finite metrics {metrics}; lower lr (now {cfg.lr})")
    policy.eval()
    model_dir = save_policy(policy, tok, out_dir)
    write_json_atomic(out_dir / "metrics.json", {"history": history})
    result = PolicyResult(model_dir=model_dir, algorithm="ppo", parent_dir=str(policy_dir), metrics=metrics,
                          files={"metrics": str(out_dir / "metrics.json")})
    write_json_atomic(out_dir / "manifest.json", {
        "stage": "ppo", "config": cfg.model_dump(mode="json"), "policy_dir": str(policy_dir),
        "value_init_dir": None if value_init_dir is None else str(value_init_dir), "prompts": len(prompts),
        "result": result.model_dump(mode="json")})
    log.info("PPO: %d iterations, reward %.3f -> %.3f, KL %.3f -> %s", len(history), metrics["reward_first"],
             metrics["reward_last"], metrics["kl_last"], model_dir)
    return result
