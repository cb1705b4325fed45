"""GradCache on several processes (sec. 3.4 of the paper) and the baselines to compare it with.

- :class:`LocalLoss`: each rank scores its own rows against every rank's columns (gcbench's losses);
  with DDP's average, the gradient of the global batch's loss (the default for the built-in losses);
- :func:`all_gather_with_grad` / :class:`GatherLoss`: the loss over the global batch on every rank (any
  loss), gradients back to the local representations only, scaled so DDP's average is the full gradient;
- :func:`distribute`: any :class:`~gcbench.cache.Objective` as a W-rank one (DDP encoders, and the
  gathered loss for the strategies with global negatives); :func:`shard`: rank r's rows of a global batch;
- :func:`launch`: run a function on W ranks; a failing or hanging rank ends the run. Under
  ``torchrun`` (:class:`LaunchedRanks`) it runs the function as the rank torchrun started instead.

W-rank gradient checks live in :mod:`gcbench.measure.ranks` (``gcbench verify --nproc``), a W-rank sweep
point in :mod:`gcbench.sweep.point`.
"""

from gcbench.distributed.gather import GatherLoss, all_gather_with_grad, check_equal_rows, gather_rows
from gcbench.distributed.launch import (
    LaunchedRanks,
    RankError,
    RankInfo,
    is_leader,
    join_launched_group,
    launch,
    ranks_wanted,
    resolve_backend,
)
from gcbench.distributed.local import LocalLoss, RankCollectives
from gcbench.distributed.objective import distribute, distribute_step, gathers, rank_loss, shard

__all__ = [
    "GatherLoss",
    "LaunchedRanks",
    "LocalLoss",
    "RankCollectives",
    "RankError",
    "RankInfo",
    "all_gather_with_grad",
    "check_equal_rows",
    "distribute",
    "distribute_step",
    "gather_rows",
    "gathers",
    "is_leader",
    "join_launched_group",
    "launch",
    "rank_loss",
    "ranks_wanted",
    "resolve_backend",
    "shard",
]
