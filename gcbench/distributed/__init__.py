"""GradCache on several processes (sec. 3.4 of the paper) and the baselines to compare it with.

- :func:`all_gather_with_grad` / :class:`GatherLoss`: the loss over the global batch on every rank,
  gradients back to the local representations only, scaled so DDP's average is the full gradient;
- :func:`distribute`: any :class:`~gcbench.strategies.Objective` as a W-rank one (DDP encoders, and the
  gathered loss for the exact strategies); :func:`shard`: rank r's rows of a global batch;
- :func:`launch`: run a function on W ranks; a failing or hanging rank ends the run;
- :func:`verify_distributed`: W-rank gradients against one process over the global batch.

``gcbench.distributed.sweep.measure_point_distributed`` measures a sweep point on W ranks (import it
from there: it depends on the sweep package).
"""

from gcbench.distributed.gather import GatherLoss, all_gather_with_grad, check_equal_rows, gather_rows
from gcbench.distributed.launch import RankError, RankInfo, launch, resolve_backend
from gcbench.distributed.objective import distribute, distribute_step, gathers, shard
from gcbench.distributed.verify import check_distributed, verify_distributed

__all__ = ["GatherLoss", "RankError", "RankInfo", "all_gather_with_grad", "check_distributed", "check_equal_rows",
           "distribute", "distribute_step", "gather_rows", "gathers", "launch", "resolve_backend", "shard",
           "verify_distributed"]
