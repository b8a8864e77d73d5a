"""torchrun entry point for pretraining: reads rank/world size from the environment, initialises the
process group (nccl on GPU, gloo on CPU; ``tasks.torchrun_stage.init_process_group``, shared with the reward-model,
SFT and DPO entry) and calls ``stages.pretrain.pretrain``.

    torchrun --nproc_per_node N tasks/torchrun_pretrain.py --config cfg.json --data train/ \
        --heldout heldout/ --out out/

``--config`` is a JSON file (or inline JSON) ``{"pretrain": {...}, "model": {...}}``; either may be omitted.
Rank 0 writes ``<out>/result.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

from stages.common import write_json_atomic
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig, pretrain
from tasks.torchrun_stage import init_process_group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="{}", help="JSON file or inline JSON with 'pretrain' and 'model' keys")
    p.add_argument("--data", required=True, help="tokenised train split folder")
    p.add_argument("--heldout", default=None, help="tokenised held-out split folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stop-after-steps", type=int, default=None)
    args = p.parse_args(argv)
    raw = Path(args.config).read_text() if os.path.isfile(args.config) else args.config
    spec = json.loads(raw)
    cfg = PretrainConfig.model_validate(spec.get("pretrain", {}))
    model_cfg = ModelConfig.model_validate(spec.get("model", {}))

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    rank, world_size = init_process_group(cfg.device, "pretraining.nproc", "pretraining.train.device")
    try:
        result = pretrain(cfg, model_cfg, args.data, args.heldout, args.out, rank=rank, world_size=world_size,
                          stop_after_steps=args.stop_after_steps)
        if rank == 0:
            write_json_atomic(Path(args.out) / "result.json", result.model_dump(mode="json"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
