"""torchrun for the trainers after pretraining (reward models, SFT, DPO): the launcher the Prefect tasks call when a
section's ``nproc`` is above 1, and the entry point every process runs.

    python -m torch.distributed.run --nproc_per_node N tasks/torchrun_stage.py STAGE --spec SPEC

``STAGE`` is one of :data:`STAGES`; ``SPEC`` a JSON file or inline JSON ``{"config": {...}, "inputs": {...}}``
(the stage's config and its input paths, ``out_dir`` among them). Each process reads its rank and the world size
from the environment, initialises the process group (nccl on GPU, gloo on CPU) and calls the stage, which shards the
work (``stages.distributed``); rank 0 writes ``<out_dir>/result.json``. The stage's own ``manifest.json`` makes a
later in-process call return the same result, which is how the tasks read it back.

This module imports neither Prefect nor MLflow: the processes start quickly, and tests launch through it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed
from pydantic import BaseModel

from stages.common import write_json_atomic
from stages.dpo import DPOConfig, dpo
from stages.errors import ConfigError
from stages.reward import RMConfig, train_reward_model
from stages.sft import SFTConfig, sft
from stages.sft_data import read_conversations

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, args: list[str], nproc: int, what: str, *, timeout: float | None = None) -> None:
    """``script args`` in ``nproc`` processes on this machine (torchrun on a free port, one OpenMP thread each);
    RuntimeError with the end of their stderr when one fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {what} failed:\n{proc.stderr[-3000:]}")


def launch(stage: str, cfg: BaseModel, inputs: dict[str, Any], nproc: int, *, timeout: float | None = None) -> dict:
    """Run ``stage`` with ``cfg`` on ``inputs`` in ``nproc`` processes; rank 0's result (``<out_dir>/result.json``)."""
    if stage not in STAGES:
        raise ConfigError(f"no torchrun stage {stage!r}; choose one of {sorted(STAGES)}")
    spec = json.dumps({"config": cfg.model_dump(mode="json"), "inputs": inputs})
    run_torchrun(Path(__file__), [stage, "--spec", spec], nproc, stage, timeout=timeout)
    return json.loads((Path(inputs["out_dir"]) / "result.json").read_text())


# ---------------------------------------------------------------------------------------------- entry point


def init_process_group(device: str, nproc_field: str, device_field: str) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; with more than one process the group is initialised:
    nccl when ``device`` may be a GPU and one is visible (one per process, else a ConfigError naming the fields),
    gloo otherwise."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        if backend == "nccl":
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if local_ranks > torch.cuda.device_count():
                raise ConfigError(f"{local_ranks} processes per node but {torch.cuda.device_count()} visible GPU(s): "
                                  f"NCCL needs one GPU per process; set {nproc_field} to at most the GPU count, "
                                  f"or {device_field} to 'cpu' (gloo)")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return rank, world_size


@dataclass(frozen=True)
class Stage:
    """A stage torchrun can run: its config model, how it is called on the spec's inputs, and where its process
    count and device are set (named by error messages)."""

    config: type[BaseModel]
    run: Callable[[Any, dict], BaseModel]
    nproc_field: str
    device: Callable[[Any], tuple[str, str]]  # cfg -> (its device, that field's name)


def _reward(cfg: RMConfig, inputs: dict) -> BaseModel:
    return train_reward_model(cfg, inputs["init_dir"], inputs["batch_dirs"], inputs["out_dir"])


def _sft(cfg: SFTConfig, inputs: dict) -> BaseModel:
    return sft(cfg, inputs["base_model_dir"], inputs["tokenizer_dir"], read_conversations(Path(inputs["sft_data"])),
               inputs["out_dir"])


def _dpo(cfg: DPOConfig, inputs: dict) -> BaseModel:
    return dpo(cfg, inputs["policy_dir"], inputs["batch_dirs"], inputs["out_dir"], ref_cache=inputs.get("ref_cache"))


STAGES: dict[str, Stage] = {
    "reward": Stage(RMConfig, _reward, "rewards.nproc", lambda c: (c.device, f"rewards.{c.category}.device")),
    "sft": Stage(SFTConfig, _sft, "sft.nproc", lambda c: (c.train.device, "sft.train.device")),
    "dpo": Stage(DPOConfig, _dpo, "alignment.dpo.nproc", lambda c: (c.device, "alignment.dpo.device")),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a herd trainer in every process of a torchrun launch.")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--spec", required=True, help="JSON file or inline JSON: {'config': {...}, 'inputs': {...}}")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text() if os.path.isfile(args.spec) else args.spec)
    stage = STAGES[args.stage]
    cfg = stage.config.model_validate(spec.get("config", {}))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    device, device_field = stage.device(cfg)
    init_process_group(device, stage.nproc_field, device_field)
    try:
        result = stage.run(cfg, spec["inputs"])
        if rank == 0:
            write_json_atomic(Path(spec["inputs"]["out_dir"]) / "result.json", result.model_dump(mode="json"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
