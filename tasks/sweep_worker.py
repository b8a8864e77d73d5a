"""IsoFLOP sweep runs in their own process (one core): ``python -m tasks.sweep_worker SPEC_JSON`` runs one;
``python -m tasks.sweep_worker --serve`` runs one spec per line of stdin, answering each with a JSON line on stdout
(``{"ok": true}`` or ``{"ok": false, "error": ...}``), so a sweep pays for importing torch and transformers once per
worker rather than once per run.

The model has about N scaling parameters (non-embedding + output head, ``stages.model.scaling_params``;
the shape from ``ModelConfig.for_params``) and trains on D = C / (6 N) tokens; the result (held-out loss, actual N and D) is written to ``<out>/result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages.common import write_json_atomic
from stages.model import ModelConfig, scaling_params
from stages.pretrain import PretrainConfig, TokenSplit, pretrain


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    run, out = spec["run"], Path(spec["out"])
    train_cfg = PretrainConfig.model_validate(spec["train"])
    vocab = TokenSplit(spec["data"]["train"]).vocab_size
    model_cfg = ModelConfig.for_params(run["N"], vocab_size=vocab, head_dim=spec["head_dim"], aspect=spec["aspect"],
                                       max_seq_len=max(train_cfg.seq_len, 128))
    n = scaling_params(model_cfg, vocab)
    tokens = max(train_cfg.batch_tokens, int(run["C"] / (6 * n)))
    cfg = train_cfg.derive(max_tokens=tokens, steps=None, num_threads=1)
    res = pretrain(cfg, model_cfg, spec["data"]["train"], spec["data"]["heldout"], out / "train")
    write_json_atomic(out / "result.json", {
        "C": run["C"], "N_planned": run["N"], "N": n, "tokens": res.tokens, "loss": res.heldout_loss,
        "loss_by_source": res.heldout_loss_by_source,
        "final_train_loss": res.final_loss, "seconds": res.tokens / max(res.tokens_per_s, 1e-9),
        "shape": {"dim": model_cfg.dim, "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads},
    })


def serve() -> None:
    """Runs, one spec per line of stdin, until stdin closes."""
    import traceback

    out = sys.stdout
    sys.stdout = sys.stderr  # only the answers on stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            main(line)
            answer = {"ok": True}
        except Exception as exc:  # noqa: BLE001  (reported to the task, which raises it)
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        main(sys.argv[1])
