"""The data-parallel pieces every trainer shares: how a global batch is cut over processes (the multi-process runs
themselves are tested beside each trainer: test_pretrain, test_reward, test_sft, test_ppo_dpo)."""

from __future__ import annotations

import pytest

from stages.distributed import Piece, Processes
from stages.errors import ConfigError


@pytest.mark.parametrize(("n", "world", "micro"), [(8, 1, 3), (8, 2, 4), (8, 2, 2), (5, 2, 2), (5, 4, 8), (3, 4, 1)])
def test_ranks_split_a_batch_exactly_and_line_up(n, world, micro):
    """Every item on exactly one rank, in order; every rank as many pieces (collectives line up), fillers weighted
    0; the weights add up to the world size times the batch (gradients are averaged over processes)."""
    batch = list(range(n))
    ranks = [Processes(rank=r, world_size=world).micro_batches(batch, micro) for r in range(world)]
    assert len({len(pieces) for pieces in ranks}) == 1
    real = [p for pieces in ranks for p in pieces if p.weight]
    assert [i for p in real for i in p.items] == batch
    assert all(len(p.items) <= micro and p.weight == len(p.items) * world for p in real)
    assert all(p.items == [0] for pieces in ranks for p in pieces if not p.weight)
    assert sum(p.weight for pieces in ranks for p in pieces) == n * world


def test_one_process_is_the_plain_micro_batch_loop():
    assert Processes().micro_batches(list("abcde"), 2) == [Piece(["a", "b"], 2), Piece(["c", "d"], 2), Piece(["e"], 1)]
    assert Processes().sum([1.5, 2.0], device=None) == [1.5, 2.0] and Processes().broadcast({"x": 1}) == {"x": 1}


def test_fsdp_without_a_launch_names_the_fix():
    assert Processes.current("ddp") == Processes()
    with pytest.raises(ConfigError, match="this run has none: set x.nproc to 2"):
        Processes.current("fsdp", fix="set x.nproc to 2 or more")
