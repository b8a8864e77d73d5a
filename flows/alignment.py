"""Flows after pretraining: supervised fine-tuning, collecting preference batches, reward models."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from herd.settings import load_settings
from stages.collect import PreferenceLoopConfig
from stages.common import confined
from stages.errors import ConfigError
from stages.presets import tiny
from stages.preferences import batch_dirs
from stages.reward import RewardsConfig, trained_batches
from stages.sft import SFTConfig
from tasks.common import get_latest, set_latest
from tasks.progress import report
from tasks.rewards import annotate_task, collect_task, reward_model_task, staleness_task
from tasks.sft import sft_data_task, sft_task
from tasks.tracking import parent_run


def sft_base(config: SFTConfig, base_model: str | None, tokenizer: str | None) -> tuple[str, str]:
    """The base model and tokenizer folders SFT starts from: ``base_model`` (a user's ``--base``), else
    ``config.base`` (a folder under $HERD_HOME; a relative one is taken from $HERD_HOME, as presets name
    ``models/smollm2-135m``), else herd's latest pretrained model."""
    s = load_settings()
    if base_model is None and config.base != "pretrained":  # a config (YAML, UI form) names a folder: keep it home
        named = Path(config.base).expanduser()
        base_model = str(confined(named if named.is_absolute() else s.home / named, s.home, field="sft.base",
                                  hint="keep models under $HERD_HOME (`herd models import` writes "
                                  "$HERD_HOME/models/NAME) or name the folder with `herd sft --base DIR`"))
        if not any(Path(base_model).glob("*.safetensors")):
            name = Path(base_model).name
            raise ConfigError(f"sft.base: no model weights in {base_model}: run `herd models import {name}` first "
                              "(or set sft.base to a folder with a saved LlamaForCausalLM)")
    if base_model is not None:  # a user's model folder carries its own tokenizer unless one is named
        return base_model, tokenizer or base_model
    model, tok = get_latest(s.home, "model"), tokenizer or get_latest(s.home, "tokenizer")
    if not model or not tok:
        raise ValueError("no base model: run `herd pretrain` (or `herd demo`) first, or set sft.base to a folder "
                         "with a saved LlamaForCausalLM and its tokenizer")
    return model, tok


@flow(name="sft")
def sft_flow(config: SFTConfig = tiny().sft, base_model: str | None = None, tokenizer: str | None = None,
             parent_run_id: str | None = None) -> dict:
    """Supervised fine-tuning of the pretrained (or a given) Llama on chat data: answer tokens only.

    Args:
        config: Chat data sources, tokenization, optimiser, epochs and the base model (`base`).
        base_model: Folder of a saved LlamaForCausalLM (safetensors) to fine-tune instead of `config.base`.
        tokenizer: Tokenizer folder (default: the base model's own, else herd's latest tokenizer).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    base, tok = sft_base(config, base_model, tokenizer)
    with parent_run("sft", config, parent_run_id) as run_id:
        data = sft_data_task(config.data, str(s.store), str(s.cache), run_id)
        report("sft-data", {"docs": data["conversations"]})
        res = sft_task(config, base, tok, data, str(s.store), run_id)
        report("sft", {})
    set_latest(s.home, sft_model=res["model_dir"], sft_data=data["path"])
    return {**res, "data": data}


@flow(name="preference-collect")
def preference_collect_flow(config: PreferenceLoopConfig = tiny().preferences, policy: str | None = None,
                            batch_index: int | None = None, simulate_annotator: bool = True,
                            parent_run_id: str | None = None) -> dict:
    """Sample two responses per prompt from the policy (the next batch to annotate); with
    ``simulate_annotator`` the rubric annotator labels it into the inbox, as a human export would land.

    Args:
        config: Sampling (prompts, temperatures, generation) and the simulated annotator.
        policy: Chat model folder to sample from (default: the latest policy, else the SFT model).
        batch_index: Number of the batch (default: one more than the batches collected so far).
        simulate_annotator: Label the pairs with the rubric annotator into $HERD_HOME/preferences/inbox.
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    policy = policy or get_latest(s.home, "policy") or get_latest(s.home, "sft_model")
    sft_data = get_latest(s.home, "sft_data")
    if not policy or not sft_data:
        raise ValueError("no policy to sample from: run `herd sft` (or `herd demo`) first")
    root = s.preferences / "collect"
    index = batch_index if batch_index is not None else len(list(root.glob("batch-*"))) + 1
    with parent_run("preference-collect", config, parent_run_id) as run_id:
        pairs = collect_task(config.collect, policy, sft_data, index, str(root), run_id)
        report("collect", {"docs": pairs["pairs"]})
        labelled = None
        if simulate_annotator:
            labelled = annotate_task(config.annotator, pairs["pairs_file"], str(s.preferences / "inbox"),
                                     f"annotated-batch-{index:03d}-{Path(pairs['pairs_file']).parent.name[-8:]}",
                                     run_id)
            report("annotate", {"docs": labelled["records"]})
    return {"pairs": pairs, "annotated": labelled, "batch_index": index}


@flow(name="reward-models")
def reward_models_flow(config: RewardsConfig = tiny().rewards, sft_model: str | None = None,
                       parent_run_id: str | None = None) -> dict:
    """Ingest new exports, score the current RMs on each batch they were not trained on (staleness), then
    retrain both RMs on every batch so far and register them (`rm-helpfulness`, `rm-safety`).

    Args:
        config: The helpfulness and safety reward-model configs.
        sft_model: SFT model folder the reward models start from (default: the latest SFT model).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    from flows.preferences import preference_inbox_flow

    s = load_settings()
    init = sft_model or get_latest(s.home, "sft_model")
    if not init:
        raise ValueError("no SFT model to initialise the reward models from: run `herd sft` first")
    with parent_run("reward-models", config, parent_run_id) as run_id:
        inbox = preference_inbox_flow(parent_run_id=run_id)
        batches = [str(d) for d in batch_dirs(s.preferences)]
        if not batches:
            raise ValueError(f"no preference batches under {s.preferences}: ingest an export first")
        ingested = [r["batch_dir"] for r in inbox["ingested"] if r.get("batch_dir")]
        results, stale, new = {}, {}, []
        for rm in (config.helpfulness, config.safety):
            current = get_latest(s.home, f"rm_{rm.category}")
            # new to the current RM, whoever ingested them (the preference-inbox deployment may have run first)
            seen = trained_batches(current) if current else None
            unseen = ingested if seen is None else [b for b in batches if Path(b).name not in seen]
            new += [b for b in unseen if b not in new]
            stale[rm.category] = [x for x in (staleness_task(rm, current, b, run_id) for b in unseen) if x]
            results[rm.category] = reward_model_task(rm, init, batches, str(s.store), run_id, config.nproc)
            report(f"rm-{rm.category}", {})
    set_latest(s.home, rm_helpfulness=results["helpfulness"]["model_dir"], rm_safety=results["safety"]["model_dir"])
    return {"batches": [Path(b).name for b in batches], "new_batches": [Path(b).name for b in new],
            "staleness": stale, "reward_models": results}
