"""The end-to-end pipeline: every stage flow, composed (what `make demo` and `herd demo` run)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.curation import curation_flow, data_fetch_flow, mix_flow
from flows.pretraining import pretrain_flow, scaling_fit_flow, scaling_sweep_flow, tokenizer_flow
from herd.settings import load_settings
from stages.presets import PipelineConfig, tiny
from tasks.tracking import parent_run


@flow(name="herd-pipeline")
def pipeline_flow(config: PipelineConfig = tiny()) -> dict:
    """The end-to-end pipeline: fetch -> curate -> mix -> tokenizer -> IsoFLOP sweep -> fit -> pretrain."""
    s = load_settings()
    with parent_run("herd-pipeline", config) as run_id:
        fetched = data_fetch_flow(config.fetch, parent_run_id=run_id)
        curated = curation_flow([fetched["path"]], str(s.home / "curated" / config.name), config.curation, config.fetch,
                                parent_run_id=run_id)
        mixed = mix_flow([curated["output"] + "/kept"], str(s.home / "mixed" / config.name), config.mix,
                         parent_run_id=run_id)
        p = config.pretraining
        tok = tokenizer_flow([mixed["output"]], str(s.home / "tokenizer" / config.name), p, parent_run_id=run_id)
        fit = None
        if p.size == "auto":  # size from the scaling laws: IsoFLOP sweep, then the fit's recommendation
            sweep = scaling_sweep_flow(p, tok["tokens"]["path"], parent_run_id=run_id)
            fit = scaling_fit_flow(sweep["runs_csv"], str(s.home / "scaling" / config.name), p.fit, p.budget,
                                   parent_run_id=run_id)
        model = pretrain_flow(p, tok["tokens"]["path"], str(Path(fit["output"]) / "fit.json") if fit else None,
                              parent_run_id=run_id)
    return {"fetch": {"path": fetched["path"], "docs": fetched["docs"]}, "curation": curated,
            "mix": {k: mixed[k] for k in ("output", "key")},
            "tokenizer": {"path": tok["tokenizer"]["path"], "compression": tok["tokenizer"]["compression"]},
            "scaling": {k: fit[k] for k in ("output", "isoflop", "parametric", "ci", "recommendation")} if fit else None,
            "pretrain": {k: model[k] for k in ("size", "num_params", "scaling_params", "tokens", "final_loss", "heldout_loss",
                                               "heldout_loss_by_source", "tokens_per_s", "mfu", "model_dir")}}
