"""The recipe on a real model: the `smollm2-cpu` preset through the whole pipeline (SFT of the imported
SmolLM2-135M-Instruct, a preference batch sampled from it, both reward models initialised from it, RLHF-V1 by
rejection sampling, benchmarks of every stage and the report card) under a Prefect test server with a real MLflow
store. What the tiny demo's ~0.1M-parameter model never exercises: a 135M Llama with GQA, a tied head, a
tokenizer and chat template of its own, and an imported starting point instead of herd's pretraining."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest

from tests.flows.test_lineage import own_store

pytestmark = pytest.mark.slow


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` into ``dst`` by hard links (a 0.5 GB model, no copy), copied where links are not possible."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


@pytest.fixture(scope="module")
def smol_run(prefect_mlflow, package_cache, smollm2, tmp_path_factory):
    from flows.pipeline import pipeline_flow
    from stages.presets import get_preset

    cfg = get_preset("smollm2-cpu")
    with own_store(tmp_path_factory.mktemp("smollm2") / "home", package_cache) as home:
        _link_tree(smollm2, home / "models" / "smollm2-135m")  # where `herd models import smollm2-135m` puts it
        yield {"result": pipeline_flow(cfg), "home": home, "cfg": cfg}
        for heavy in ("store", "mlartifacts", "models"):  # ~5 GB of 135M-parameter copies; the logs stay
            shutil.rmtree(home / heavy, ignore_errors=True)


def test_the_pipeline_starts_from_the_imported_model_and_skips_pretraining(smol_run):
    res = smol_run["result"]
    assert res["pretrain"] is None and res["curation"] is None and res["tokenizer"] is None
    assert res["base_model"] == str((smol_run["home"] / "models" / "smollm2-135m").resolve())
    card = json.loads((Path(res["report"]["path"]) / "report.json").read_text())
    rows = {r["stage"]: r for r in card["stages"]}
    assert list(rows) == ["base", "sft", "rlhf-v1"]
    assert 134e6 < rows["base"]["params"] < 135e6  # SmolLM2-135M: 134.5M with the tied head counted once
    for stage in rows.values():  # every stage scored on the preset's benchmarks, near chance or above
        for task in ("hellaswag", "arc_easy", "piqa"):
            m = stage["benchmarks"][task]["metrics"]
            assert 0.0 <= m["acc"] <= 1.0 and 0.0 < m["bpb"] < 5.0, (stage["stage"], task, m)


def test_sft_fine_tunes_smollm2_with_its_own_tokenizer_and_chat_template(smol_run):
    from transformers import AutoConfig, AutoTokenizer

    sft_dir = Path(smol_run["result"]["sft"]["model_dir"])
    cfg = AutoConfig.from_pretrained(sft_dir, local_files_only=True)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == \
        (30, 9, 3, 576)  # GQA kept
    assert cfg.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(sft_dir, local_files_only=True)  # the SFT folder carries the base's own
    assert "<|im_start|>" in tok.chat_template
    loss = smol_run["result"]["sft"]["heldout_loss"]
    assert 0.0 < loss < 4.0  # an instruct model on chat data: far below the uniform log(49152) = 10.8


def test_reward_models_and_the_policy_are_registered_from_the_real_model(smol_run):
    client = mlflow.MlflowClient()
    res = smol_run["result"]
    (rm_round,) = res["reward_rounds"]
    for cat in ("helpfulness", "safety"):
        (v,) = client.search_model_versions(f"name='rm-{cat}'")
        rm = rm_round["reward_models"][cat]
        assert 0.0 <= rm["heldout_accuracy"] <= 1.0 and rm["by_rating"]  # Table 8's per-rating accuracy is there
    (round1,) = res["alignment"]
    assert round1["algorithms"] == ["rejection_sampling"]
    v1 = client.get_model_version_by_alias("policy", "rlhf-v1")
    policy_cfg = json.loads((Path(v1.tags["herd.model_dir"]) / "config.json").read_text())
    assert policy_cfg["num_key_value_heads"] == 3 and policy_cfg["num_hidden_layers"] == 30
    assert 0.0 <= round1["violation_rate"] <= 1.0 and 0.0 <= round1["false_refusal_rate"] <= 1.0
