"""SFT -> collect a batch -> simulated annotation -> inbox ingest -> reward models, twice (the weekly
loop), under a Prefect test server with a real MLflow store and registry, on the smoke preset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import mlflow
import pytest

from stages.model import ModelConfig, build_model
from stages.presets import smoke
from stages.tokenizer import TokenizerConfig, train_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A small base Llama and its tokenizer (trained on chat-like text), as a user's model folder would be."""
    from stages.sft_data import load_safety_demos

    root = tmp_path_factory.mktemp("align-base")
    (root / "corpus").mkdir()
    with gzip.open(root / "corpus" / "00000.jsonl.gz", "wt") as fh:
        for i, d in enumerate(load_safety_demos() * 3):
            fh.write(json.dumps({"id": f"d{i}", "text": d["prompt"] + " " + d["response"], "source": "qa"}) + "\n")
    tok = root / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=512), [root / "corpus"], tok)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok), local_files_only=True))
    model = root / "base"
    build_model(ModelConfig.from_flavour("debug"), vocab, seed=0).save_pretrained(model)
    return model, tok


@pytest.fixture(scope="module")
def loop(prefect_mlflow, base):
    from flows.alignment import preference_collect_flow, reward_models_flow, sft_flow

    cfg = smoke()
    tuned = sft_flow(cfg.sft, str(base[0]), str(base[1]))
    rounds = []
    for k in (1, 2):
        collected = preference_collect_flow(cfg.preferences, tuned["model_dir"], batch_index=k)
        rounds.append((collected, reward_models_flow(cfg.rewards, tuned["model_dir"])))
    return {"sft": tuned, "rounds": rounds, "cfg": cfg, "home": prefect_mlflow}


def test_sft_trains_on_answers_and_saves_a_chat_model(loop):
    sft = loop["sft"]
    assert sft["tokens"]["train"]["scored_tokens"] < sft["tokens"]["train"]["tokens"]
    assert {"sharegpt", "evals", "python_faq", "safety", "gatt"} <= set(sft["data"]["sources"])
    assert "unclear" in sft["data"]["sources"]["sharegpt"]["license"]  # recorded as such
    model_dir = Path(sft["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    run = [r for r in mlflow.search_runs(experiment_names=["herd"], output_format="list")
           if r.info.run_name == "sft/train"][-1]
    assert "final_loss" in run.data.metrics and run.inputs.dataset_inputs


def test_collected_pairs_are_annotated_into_the_inbox(loop):
    collected, _ = loop["rounds"][0]
    pairs = [json.loads(x) for x in Path(collected["pairs"]["pairs_file"]).read_text().splitlines()]
    n = loop["cfg"].preferences.collect.prompts
    assert len(pairs) == n and all(len(p["responses"]) == 2 for p in pairs)
    assert {p["category"] for p in pairs} == {"helpfulness", "safety"}
    exported = [json.loads(x) for x in Path(collected["annotated"]["file"]).read_text().splitlines()]
    assert len(exported) == n and {r["annotator_id"] for r in exported} == {"sim-rubric-v1"}
    assert collected["pairs"]["tokens_per_s"] > 0


def test_reward_models_are_retrained_registered_and_traceable_to_batches(loop):
    (_, first), (_, second) = loop["rounds"]
    assert len(first["batches"]) == 1 and len(second["batches"]) == 2 and second["new_batches"]
    assert first["staleness"] == {"helpfulness": [], "safety": []}  # nothing to be stale against yet
    for cat in ("helpfulness", "safety"):
        st = second["staleness"][cat]
        assert len(st) == 1 and st[0]["batch_id"] == second["new_batches"][0] and st[0]["pairs"] > 0
        rm = second["reward_models"][cat]
        assert rm["registered"] == f"rm-{cat}" and rm["version"] == first["reward_models"][cat]["version"] + 1
        assert rm["batches"] == second["batches"]
        client = mlflow.MlflowClient()
        version = client.get_model_version(f"rm-{cat}", str(rm["version"]))
        assert version.tags["herd.batches"] == ",".join(second["batches"])
        run = client.get_run(version.run_id)
        names = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert {f"preferences/{b}" for b in second["batches"]} <= names and "sft-model" in names
        assert (Path(rm["model_dir"]) / "model.safetensors").is_file()
