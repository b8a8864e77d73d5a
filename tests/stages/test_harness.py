"""The benchmark scorer: packed rows (a context once, every choice in its own block) give exactly the
log-likelihoods of full sequences, metrics are computed as lm-eval-harness computes them, generation stops
where it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.errors import ConfigError
from stages.evaluation.harness import (
    HarnessConfig,
    bpb_with_stderr,
    choice_loglikelihoods,
    encode_pair,
    extract_number,
    fewshot_prefixes,
    greedy_generate,
    humaneval_program,
    mc_metrics,
    sample_items,
)
from stages.evaluation.items import GenItem, MCItem
from tests.stages._policy import make_policy, one_thread

TEXTS = [f"The {a} sat on the {b} and looked at the {c}. It was {d}." for a in ("cat", "dog", "bird", "fox")
         for b in ("mat", "rug", "chair") for c in ("moon", "sun", "door") for d in ("calm", "late", "warm")]

_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from stages.model import load_causal_lm

    d = make_policy(tmp_path_factory.mktemp("harness"), TEXTS)
    model = load_causal_lm(d).eval()
    model.config.use_cache = True
    return model, AutoTokenizer.from_pretrained(str(d), local_files_only=True), d


def naive_ll(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    from stages.evaluation.harness import bos_prefix

    ctx, cont = encode_pair(tok, context, continuation, bos_prefix(tok))
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[-len(cont):]
    hit = (logp.argmax(-1) == tgt)[-len(cont):].all()
    return float(lp.sum()), bool(hit)


ITEMS = [
    MCItem("q1", ("The cat sat on the",) * 3, (" mat", " moon and looked", " chair"), 0),
    MCItem("q2", ("It was",) * 2, (" calm.", " late and the dog sat on the rug."), 1),
    # Winogrande-style: contexts differ, the continuation is shared
    MCItem("w1", ("The dog sat on the rug", "The fox sat on the door"), (" and looked at the sun.",) * 2, 1),
    MCItem("l1", ("The bird sat on the chair and looked at the ",), ("moon",), 0, greedy_check=True),
]


def test_kv_reuse_matches_full_sequences(tiny):
    model, tok, _ = tiny
    for budget in (64, 100_000):  # tiny chunks (one group each) and one chunk for everything
        lls, greedy = choice_loglikelihoods(model, tok, ITEMS, ["Prefix. "] * len(ITEMS), batch_tokens=budget,
                                            max_length=512, device=torch.device("cpu"))
        for it, ll, gr in zip(ITEMS, lls, greedy):
            for c in range(it.n_choices):
                ref, hit = naive_ll(model, tok, "Prefix. " + it.contexts[c], it.continuations[c])
                assert ll[c] == pytest.approx(ref, abs=1e-4), (it.id, c)
                assert gr[c] == (hit and it.greedy_check)  # checked only where asked


def test_trailing_space_moves_to_the_continuation(tiny):
    _, tok, _ = tiny
    a = encode_pair(tok, "It was ", "calm.", [])
    b = encode_pair(tok, "It was", " calm.", [])
    assert a == b


def test_mc_metrics_acc_norm_bpb_centered():
    items = [MCItem("a", ("Q",) * 2, (" yes", " a much longer answer"), 1),
             MCItem("b", ("Q",) * 2, (" no", " x"), 0)]
    lls = [np.array([-2.0, -10.0]), np.array([-1.0, -3.0])]
    metrics, stderr, recs = mc_metrics(items, lls, [np.zeros(2, bool)] * 2, 0.5, 50, 0)
    assert metrics["acc"] == 0.5  # item a: " yes" wins on raw log-likelihood; b: right
    # acc_norm: a: -2/3 vs -10/20 = -0.5 -> choice 1 (gold); b: -1/2 vs -3/1 -> choice 0 (gold)
    assert metrics["acc_norm"] == 1.0
    assert metrics["centered_acc"] == 0.0
    bits = (10.0 + 1.0) / math.log(2)
    assert metrics["bpb"] == pytest.approx(bits / (len(" a much longer answer") + len(" no")))
    assert stderr["acc"] == pytest.approx(np.std([0, 1], ddof=1) / math.sqrt(2))
    assert recs[0]["acc_norm"] == 1.0


def test_bpb_stderr_zero_for_identical_items():
    bpb, se = bpb_with_stderr(np.array([2.0, 2.0, 2.0]), np.array([4.0, 4.0, 4.0]), 50, 0)
    assert bpb == pytest.approx(2.0 / math.log(2) / 4) and se == pytest.approx(0.0, abs=1e-12)


def test_gsm8k_number_extraction():
    assert extract_number("She has 3 + 4 = 7 apples. The answer is 1,250.") == "1250"
    assert extract_number("#### 42") == "42"
    assert extract_number("so 18 dollars") == "18"
    assert extract_number("no digits") is None


def test_sample_items_is_seeded_and_ordered():
    items = list(range(100))
    a = sample_items(items, 10, 1, "t")
    assert a == sorted(a) and a == sample_items(items, 10, 1, "t") and a != sample_items(items, 10, 2, "t")
    assert sample_items(items, 0, 1, "t") == items


def test_fewshot_never_shows_the_item_itself():
    class T:
        name, description, fewshot_sep = "t", "", "\n\n"
        fewshot = tuple(MCItem(f"i{k}", ("Q",), (f" a{k}",), 0) for k in range(3))

    prefixes = fewshot_prefixes(T, T.fewshot, 2, 0)
    for it, p in zip(T.fewshot, prefixes):
        assert p.count("Q a") == 2 and f"Q a{it.id[1:]}" not in p
    with pytest.raises(ConfigError, match="shots"):
        fewshot_prefixes(T, T.fewshot, 5, 0)


def test_greedy_generation_stops_at_stop_strings(tiny):
    model, tok, _ = tiny
    from stages.evaluation.harness import bos_prefix

    prompts = [bos_prefix(tok) + tok.encode(t, add_special_tokens=False) for t in ("The cat sat", "It was")]
    full, _ = greedy_generate(model, tok, prompts, [(), ()], max_new_tokens=12, batch_size=2,
                              device=torch.device("cpu"))
    word = full[0].split()[1] if len(full[0].split()) > 1 else None
    if word:  # the stop string cuts the output before it
        cut, _ = greedy_generate(model, tok, prompts, [(word,), ()], max_new_tokens=12, batch_size=2,
                                 device=torch.device("cpu"))
        assert word not in cut[0] and full[0].startswith(cut[0])
        assert cut[1] == full[1]


def test_humaneval_program_from_a_chat_answer():
    item = GenItem("h0", "import math\ndef f(x):\n    \"\"\"doc\"\"\"\n", "humaneval", "", "    return x\n",
                   test="def check(c):\n    assert c(2) == 2\n", entry_point="f")
    prog = humaneval_program(item, "Here:\n```python\ndef f(x):\n    return x\n```", chat=True)
    assert prog.startswith("import math\ndef f(x):\n    return x") and prog.rstrip().endswith("check(f)")
    assert humaneval_program(item, "    return x\n", chat=False).startswith(item.prompt + "    return x")


def test_config_rejects_negative_limit():
    with pytest.raises(ValueError, match="limit"):
        HarnessConfig(limit=-1)


def test_downstream_probe_logs_bpb_and_restores_the_model(tiny):
    from dataclasses import dataclass

    from stages.evaluation.probe import DownstreamProbe

    model, tok, d = tiny

    @dataclass
    class T:
        name: str
        items: tuple
        kind: str = "mc"
        chance: float = 1 / 3

    probe = DownstreamProbe([T("toy", tuple(ITEMS[:2]))], d, every=5, items=10)
    model.train()
    model.config.use_cache = False
    out = probe(model, torch.device("cpu"))
    assert set(out) == {"downstream/toy/bpb", "downstream/toy/acc_norm"} and out["downstream/toy/bpb"] > 0
    assert model.training and model.config.use_cache is False
    assert probe.due(10) and not probe.due(7)


def test_rows_are_batched_by_length_within_the_budget():
    from stages.evaluation.harness import _length_batches

    assert _length_batches([100, 10, 10, 10], 8) == [[0], [1, 2, 3]]  # padding 10s to 100 costs more than a forward
    assert _length_batches([5, 5, 5], 1000) == [[0, 1, 2]]
    assert sorted(map(len, _length_batches([5, 5, 5], 1000, max_tokens=10))) == [1, 2]  # 2 rows x 5 fit in 10
    assert _length_batches([300, 20], 1000, max_tokens=100) == [[0], [1]]  # wider than the budget: a row alone


def test_shared_prefixes_and_packed_segments_match_full_sequences(tiny):
    """Choices sharing leading tokens run them once (a trie); several items share a row; still exact."""
    model, tok, _ = tiny
    items = ITEMS + [
        MCItem("p1", ("The fox",) * 3, (" sat on the mat.", " sat on the rug.", " sat on the"), 2),
        MCItem("p2", ("It",) * 2, (" was calm.", " was calm. It was late."), 0, greedy_check=True),
        # a branch added under an earlier choice's path after another branch: subtrees not contiguous in the row
        MCItem("p3", ("The",) * 3, (" cat sat on the mat.", " cat looked at the sun.", " cat sat on a chair."), 0),
    ]
    for budget in (256, 100_000):
        lls, greedy = choice_loglikelihoods(model, tok, items, [""] * len(items), batch_tokens=budget,
                                            max_length=512, device=torch.device("cpu"))
        for it, ll, gr in zip(items, lls, greedy):
            for c in range(it.n_choices):
                ref, hit = naive_ll(model, tok, it.contexts[c], it.continuations[c])
                assert ll[c] == pytest.approx(ref, abs=1e-4), (it.id, c)
                assert gr[c] == (hit and it.greedy_check)  # checked only where asked