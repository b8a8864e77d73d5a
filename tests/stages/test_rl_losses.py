"""RLHF loss functions against hand-computed values: reward combination and whitening, KL penalty,
GAE, PPO's clipped objective, the clipped value loss, DPO with formatting tokens masked and Llama 3's
NLL term."""

from __future__ import annotations

import math

import pytest
import torch

from stages.losses import (
    combine_rewards,
    content_mask,
    dpo_loss,
    dpo_nll_loss,
    gae,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    sequence_logps,
    token_rewards,
    value_loss,
    whiten,
    whitened_reward,
)


def test_reward_combination_follows_llama2():
    r_h = torch.tensor([0.9, 0.9, 0.9, 0.2])
    r_s = torch.tensor([0.5, 0.1, 0.5, 0.8])
    is_safety = torch.tensor([False, False, True, False])
    # row 0: helpful prompt, safe enough -> helpfulness; row 1: safety score below 0.15 -> safety;
    # row 2: safety prompt -> safety; row 3: helpfulness
    assert combine_rewards(r_h, r_s, is_safety).tolist() == pytest.approx([0.9, 0.1, 0.5, 0.2])


def test_whitening_of_the_logit():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = whiten(x)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)
    assert w.tolist() == pytest.approx([(v - mean) / std for v in (1, 2, 3, 6)], rel=1e-5)
    s = torch.tensor([0.5, 0.880797, 0.119203])  # sigmoid(0), sigmoid(2), sigmoid(-2)
    logits = [0.0, 2.0, -2.0]
    std = math.sqrt(8 / 3)
    assert whitened_reward(s).tolist() == pytest.approx([v / std for v in logits], abs=1e-4)
    m = torch.tensor([1, 1, 0, 1])
    assert masked_mean(whiten(x, m), m).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_penalty_and_token_rewards():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert kl_per_token(logp, ref).tolist() == [[0.5, -1.0, 0.0, 0.0]]
    r = token_rewards(torch.tensor([2.0]), logp, ref, mask, beta=0.1)
    # -0.1 * KL on each token, and the sequence reward on the last response token (index 2)
    assert r.tolist()[0] == pytest.approx([-0.05, 0.1, 2.0, 0.0])


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.7                # last token: no next value
    d1 = 0.0 + 0.7 - 0.6
    d0 = 0.0 + 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.5 * a2
    a0 = d0 + 0.5 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])
    # padding after the response contributes nothing
    adv_p, _ = gae(torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.6, 0.7, 5.0]]),
                   torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert adv_p.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])


def test_ppo_clipped_objective():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.1]]))  # ratios 1.5, 0.9, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2 (clipped); token 1: min(-0.9, -0.9) = -0.9; token 2: min(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.9 + 2.2) / 3, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    # negative advantage with a ratio below 1 - eps is clipped too
    loss2, _ = ppo_policy_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                               torch.ones(1, 1))
    assert loss2.item() == pytest.approx(0.8)  # -min(-0.5, -0.8)


def test_value_loss_is_clipped_around_the_old_values():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped (1-2)^2 = 1; clipped V = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69; max = 1.69
    # token 1: (0-1)^2 = 1 both ways
    assert value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)


def test_dpo_with_formatting_tokens_masked_and_nll():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = math.log(3.0)  # p(token 1) = 3/6 at position 0
    labels = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])
    lp = sequence_logps(logits, labels, mask)
    assert lp.item() == pytest.approx(math.log(0.5) + math.log(1 / 4))  # position 1 is uniform over 4
    # header / end-of-turn ids are removed from the response mask
    assert content_mask(labels, torch.ones(1, 3), [3, 99]).tolist() == [[True, True, False]]
    pc, pr, rc, rr = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0])
    # beta * ((pc - rc) - (pr - rr)) = 0.1 * (1 - (-1)) = 0.2
    assert dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(math.log1p(math.exp(-0.2)))
    total = dpo_nll_loss(pc, pr, rc, rr, torch.tensor([4]), beta=0.1, nll_coef=0.2)
    assert total.item() == pytest.approx(math.log1p(math.exp(-0.2)) + 0.2 * (4.0 / 4))
    # the loss pushes chosen up and rejected down
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc_, pr_, rc, rr).backward()
    assert pc_.grad.item() < 0 < pr_.grad.item()
