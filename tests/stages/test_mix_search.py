"""The mixture chosen by experiment: mixtures drawn around the prior within the epoch caps, window weights that
realise a mixture on the prior's shards, the target by hand, a regression that recovers a planted optimum, and
real proxies on a synthetic corpus where one source is what the target asks for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages.errors import ConfigError, DataValidationError
from stages.mix_search import (
    MixSearchConfig,
    choose_mixture,
    fit_regression,
    loo_predictions,
    mixture_target,
    plan_search,
    predict,
    proxy_source_weights,
    proxy_size,
    read_shares,
    sample_mixtures,
    share_caps,
    spearman,
    summarize_search,
    window_shares,
    with_chosen_proxy,
    write_shares,
)
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig, TokenSplit, main_documents, pretrain
from tests.stages._tokens import write_split

PRIOR = {"web": 0.6, "code": 0.25, "books": 0.15}


def test_mixtures_are_drawn_around_the_prior_within_the_caps():
    caps = np.array([0.7, 1.0, 0.5])
    X = sample_mixtures(PRIOR, 400, (0.3, 3.0), seed=3, caps=caps)
    assert X.shape == (400, 3)
    assert np.allclose(X.sum(1), 1.0) and (X > 0).all()
    assert (X <= caps + 1e-12).all()
    assert np.array_equal(X, sample_mixtures(PRIOR, 400, (0.3, 3.0), seed=3, caps=caps))  # seeded
    # centred on the prior: uncapped draws average to it
    free = sample_mixtures(PRIOR, 2000, (0.3, 3.0), seed=3)
    assert np.abs(free.mean(0) - np.array([0.6, 0.25, 0.15])).max() < 0.02
    # a high concentration stays close, a low one spreads out
    near = sample_mixtures(PRIOR, 400, (50.0, 50.0), seed=0)
    far = sample_mixtures(PRIOR, 400, (0.3, 0.3), seed=0)
    assert near.std(0).max() < 0.05 < far.std(0).max()


def test_caps_bound_repetition_and_always_admit_the_prior():
    # 1000 tokens of code, 4 epochs of a 10k-token mixture: code may take 40%; books have 100 tokens (4%) but the
    # prior gives them 15%, which stays allowed; web's size is unknown
    caps = share_caps(["web", "code", "books"], {"code": 1000, "books": 100}, 10_000, 4.0, PRIOR)
    assert caps.tolist() == pytest.approx([1.0, 0.4, 0.15])
    with pytest.raises(ConfigError, match="max_epochs"):
        sample_mixtures(PRIOR, 10, (0.3, 3.0), 0, caps=np.array([0.2, 0.2, 0.2]))


def test_window_weights_realise_the_mixture_on_the_prior_shards():
    split = {"web": 0.8, "code": 0.15, "books": 0.05}
    want = {"web": 0.2, "code": 0.5, "books": 0.3}
    w = proxy_source_weights(want, split)
    drawn = {s: w[s] * split[s] for s in split}
    total = sum(drawn.values())
    assert {s: v / total for s, v in drawn.items()} == pytest.approx(want)
    assert sum(w.values()) / 3 == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no window of \\['qa'\\]"):
        proxy_source_weights({"web": 0.5, "qa": 0.5}, split)
    assert window_shares(np.array(["a", "b", "a", "a"])) == {"a": 0.75, "b": 0.25}


def test_the_target_is_the_configured_weighted_sum():
    cfg = MixSearchConfig(tasks=("hellaswag", "piqa"), target={"bpb": 1.0, "loss": 0.5, "loss/code": 2.0})
    bpb = {"hellaswag": 2.0, "piqa": 3.0}
    loss = {"web": 4.0, "code": 2.0, "books": 6.0}
    assert mixture_target(cfg, bpb, loss, ["web", "code", "books"]) == pytest.approx(2.5 + 0.5 * 4.0 + 2.0 * 2.0)
    with pytest.raises(ConfigError, match="'bpb/arc_easy'"):
        mixture_target(cfg.derive(target={"bpb/arc_easy": 1.0}), bpb, loss, ["web"])
    for bad in ({"ppl": 1.0}, {"bpb": -1.0}, {"loss": 0.0}, {}):
        with pytest.raises(ValueError, match="target"):
            MixSearchConfig(target=bad)


def test_the_regression_recovers_a_planted_optimum():
    """Target = -sum_s a_s log(share_s) + noise has its minimum on the simplex at share_s = a_s / sum(a): the
    fit recovers a and the search lands next to the planted optimum, away from the prior."""
    a = np.array([0.2, 0.5, 0.3])  # the optimum: web 0.2, code 0.5, books 0.3 (the prior: 0.6, 0.25, 0.15)
    cfg = MixSearchConfig(mixtures=24, eps=1e-6, ridge=1e-4, grid=20_000, top=100)
    X = sample_mixtures(PRIOR, 24, cfg.concentration, seed=1)
    rng = np.random.default_rng(0)
    y = -(np.log(X + cfg.eps) @ a) + rng.normal(0, 0.01, len(X))
    model = fit_regression(X, y, cfg.ridge, cfg.eps)
    assert np.allclose(model["coef"], -a, atol=0.03)
    assert spearman(loo_predictions(X, y, cfg.ridge, cfg.eps), y) > 0.9
    chosen, pred = choose_mixture(cfg, model, PRIOR, None)
    assert np.abs(chosen - a).max() < 0.06, chosen
    assert pred < predict(model, np.array([list(PRIOR.values())]))[0]


def test_proxy_size_is_the_sweep_prior_optimum():
    assert proxy_size(6e10, 40.0, 8000) == round(math.sqrt(6e10 / 240))
    assert proxy_size(1e6, 40.0, 8000) == 8000


def test_shares_json_is_checked(tmp_path):
    p = tmp_path / "shares.json"
    p.write_text(json.dumps({"shares": {"web": 0.5, "code": 0.5}}))
    assert read_shares(p) == {"web": 0.5, "code": 0.5}
    p.write_text(json.dumps({"shares": {"web": 0.5, "code": 0.2}}))
    with pytest.raises(DataValidationError, match="sum to 1"):
        read_shares(p)
    p.write_text("[1, 2]")
    with pytest.raises(DataValidationError, match=f"file {p}"):
        read_shares(p)
    with pytest.raises(ConfigError, match="herd mix-search"):
        read_shares(tmp_path / "none.json")


# ------------------------------------------------------------------ real proxies on a synthetic corpus


def _corpus(path: Path, n_docs: int, seed: int, vocab: int) -> Path:
    """Three sources of learnable token patterns (steps 1, 3, 7 through the vocabulary); web is most of it."""
    rng = np.random.default_rng(seed)
    docs, sources = [], []
    for i in range(n_docs):
        src = "web" if i % 5 < 3 else ("code" if i % 5 == 3 else "books")
        step = {"web": 1, "code": 3, "books": 7}[src]
        n = int(rng.integers(20, 60))
        docs.append((int(rng.integers(0, vocab)) + step * np.arange(n)) % vocab)
        sources.append(src)
    return write_split(path, docs, sources, vocab)


def test_proxies_move_the_mixture_towards_the_source_the_target_needs(tmp_path):
    """The target is held-out loss on code alone: proxies that saw more code score better, so the chosen mixture
    gives code more than the prior did, and its own proxy beats the prior's."""
    vocab = 64
    tokens = tmp_path / "tokens"
    train, heldout = _corpus(tokens / "train", 300, 0, vocab), _corpus(tokens / "heldout", 60, 1, vocab)
    mixed = tmp_path / "mixed"
    (mixed / "data").mkdir(parents=True)
    prior = {"web": 0.7, "code": 0.15, "books": 0.15}
    (mixed / "table.json").write_text(json.dumps({"tokens_budget": 10_000, "sources": [
        {"source": s, "target_share": v, "source_tokens": 10_000} for s, v in prior.items()]}))
    (tokens / "manifest.json").write_text(json.dumps({"inputs": [str(mixed / "data" / "part-0.jsonl.gz")]}))
    cfg = MixSearchConfig(mixtures=6, target={"loss/code": 1.0}, grid=2000, top=50, seed=0)
    seq_len = 32
    plan = plan_search(cfg, tokens, seq_len, budget=2e8, tokens_per_param=4.0, min_params=1000)
    assert plan["mixtures"][0] == pytest.approx(prior) and len(plan["mixtures"]) == 7
    best, _ = main_documents(TokenSplit(train), seq_len)
    assert plan["split_shares"] == window_shares(TokenSplit(train).sources[best])
    model = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=seq_len,
                        attn_implementation="eager")
    base = PretrainConfig(max_tokens=6144, seq_len=seq_len, batch_tokens=256, micro_batch_size=8, lr=1e-2,
                          warmup_steps=2, num_threads=1, peak_flops=1e12, eval_tokens=4096, log_every=100)

    def proxy(weights: dict[str, float], name: str) -> dict:
        res = pretrain(base.derive(source_weights=weights), model, train, heldout, tmp_path / name)
        return {"bpb": {}, "loss_by_source": res.heldout_loss_by_source, "loss": res.heldout_loss,
                "model_dir": str(res.model_dir)}

    proxies = [proxy(w, f"p{k}") for k, w in enumerate(plan["weights"])]
    doc = summarize_search(cfg, plan, proxies)
    code_share = [m["code"] for m in plan["mixtures"]]
    assert spearman(code_share, [r["target"] for r in doc["proxies"]]) < -0.5  # more code, lower code loss
    assert doc["shares"]["code"] > prior["code"] + 0.1, doc["shares"]
    from stages.mix_search import proxy_source_weights as weights_for
    doc = with_chosen_proxy(cfg, doc, proxy(weights_for(doc["shares"], plan["split_shares"]), "chosen"))
    assert doc["beats_prior"] and doc["measured"] < doc["prior_measured"]
    path = write_shares(tmp_path / "out", doc)
    assert read_shares(path) == pytest.approx(doc["shares"])
    assert (tmp_path / "out" / "mix_search.png").stat().st_size > 10_000
