"""What an alignment round needs, made by the real flows against the servers named in the environment
(PREFECT_API_URL, MLFLOW_TRACKING_URI, HERD_HOME), as tests/flows/test_alignment_flow.py makes it: a small base
Llama and tokenizer, SFT on the smoke preset, then twice a collected + simulated-annotated preference batch and
both reward models retrained on every batch so far.

    python -m tests.ui._prepare WORKDIR GO_FILE

It may start before the servers answer: the base model is built meanwhile, the flows wait for both health
checks. The batches wait until GO_FILE exists (`herd up` has finished). The inbox watcher `herd up` runs leaves the
simulated annotator's exports alone (herd.events.own_export): announced, each would start a round through the
inbox trigger.
Writes WORKDIR/prepared.json: the SFT model folder, the batch ids and the RM versions registered.
"""

from __future__ import annotations

import gzip
import json
import sys
import os
import time
import urllib.request
from pathlib import Path

GO_TIMEOUT_S = 600


def base_model(root: Path) -> tuple[Path, Path]:
    """A debug-flavour Llama and a tokenizer trained on chat-like text, as a user's model folder would be."""
    from transformers import AutoTokenizer

    from stages.model import ModelConfig, build_model
    from stages.sft_data import load_safety_demos
    from stages.tokenizer import TokenizerConfig, train_tokenizer

    (root / "corpus").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "corpus" / "00000.jsonl.gz", "wt") as fh:
        for i, d in enumerate(load_safety_demos() * 3):
            fh.write(json.dumps({"id": f"d{i}", "text": d["prompt"] + " " + d["response"], "source": "qa"}) + "\n")
    tok = root / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=512), [root / "corpus"], tok)
    vocab = len(AutoTokenizer.from_pretrained(str(tok), local_files_only=True))
    model = root / "base"
    build_model(ModelConfig.from_flavour("debug"), vocab, seed=0).save_pretrained(model)
    return model, tok


def wait_until(ready, what: str, timeout: float = GO_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} within {timeout:.0f} s")
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def main(workdir: str, go_file: str) -> None:
    from flows.alignment import preference_collect_flow, reward_models_flow, sft_flow
    from stages.presets import smoke

    root = Path(workdir)
    cfg = smoke()
    model, tok = base_model(root)
    prefect, mlflow = os.environ["PREFECT_API_URL"], os.environ["MLFLOW_TRACKING_URI"]
    wait_until(lambda: healthy(f"{prefect}/health") and healthy(f"{mlflow}/health"),
               f"{prefect} and {mlflow} did not both answer")
    tuned = sft_flow(cfg.sft, str(model), str(tok))
    wait_until(Path(go_file).exists, f"{go_file} did not appear")
    rms = {}
    for k in (1, 2):
        preference_collect_flow(cfg.preferences, tuned["model_dir"], batch_index=k)
        rms = reward_models_flow(cfg.rewards, tuned["model_dir"])
    (root / "prepared.json").write_text(json.dumps({
        "sft_model": tuned["model_dir"], "batches": rms["batches"],
        "reward_models": {c: m["version"] for c, m in rms["reward_models"].items()}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
