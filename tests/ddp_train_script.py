"""A tiny Trainer run that tests/test_distributed.py launches on one and on two processes.

The same file runs both ways, which is the point of labkit.train::

    python tests/ddp_train_script.py OUT                                         # 1 process
    torchrun --standalone --nproc_per_node 2 tests/ddp_train_script.py OUT       # 2 processes

Each rank saves its final weights and loss history to ``OUT/rank{r}.pt`` and gives the
Trainer its own checkpoint folder ``OUT/checkpoints_rank{r}``, so the test can tell which
ranks wrote checkpoints (only rank 0 should).

The elastic variant shares one folder, ``OUT/checkpoints``, and resumes from its newest
checkpoint, as a script run with ``torchrun --max-restarts 1`` should; ``--kill-rank R
--kill-at-step S`` makes rank R SIGKILL itself as step S begins in the first attempt (torchrun's
TORCHELASTIC_RESTART_COUNT is 0), so torchrun restarts both ranks::

    torchrun --standalone --nproc_per_node 2 --max_restarts 1 tests/ddp_train_script.py OUT \
        --elastic --checkpoint-every 1 --kill-rank 1 --kill-at-step 3

``--ignore-fraction`` turns a seeded share of the labels into IGNORE_INDEX (-100), so the ranks'
shards count different numbers of targets, and ``--grad-accum`` accumulates micro-batches
(DDP's ``no_sync`` for all but the last; each rank also saves how often it entered ``no_sync``).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from labkit.nn import EncoderLayer
from labkit.train import (
    IGNORE_INDEX,
    TrainConfig,
    Trainer,
    cleanup,
    init_distributed,
    latest_checkpoint,
)

# Shapes: N examples of T positions with D features, C classes.
N, T, D, C = 24, 4, 16, 3
SEED = 0


class TinyClassifier(nn.Module):
    """One labkit encoder layer and a linear head on the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = EncoderLayer(D, n_heads=2, d_ff=32, dropout=0.0)  # no randomness
        self.head = nn.Linear(D, C)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.encoder(x).hidden  # (B, T, D)
        return self.head(hidden.mean(dim=1))  # (B, C)


def make_data(ignore_fraction: float = 0.0) -> TensorDataset:
    """The same data on every rank (its own generator, independent of the global seed);
    a random ``ignore_fraction`` of the labels is IGNORE_INDEX."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(N, T, D, generator=generator, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=generator)
    y[torch.rand(N, generator=generator) < ignore_fraction] = IGNORE_INDEX
    return TensorDataset(x, y)


def make_model() -> TinyClassifier:
    """float64, so the one- and two-process runs agree to ~1e-12 instead of float32 noise."""
    torch.manual_seed(SEED)
    return TinyClassifier().to(torch.float64)


def train(
    out: Path,
    steps: int,
    batch_size: int,
    device: str = "cpu",
    *,
    elastic: bool = False,
    checkpoint_every: int | None = None,
    kill: tuple[int, int] | None = None,
    ignore_fraction: float = 0.0,
    grad_accum: int = 1,
) -> None:
    """Train with a shuffled, seeded order (over several epochs when steps * batch_size > N)
    and save this rank's results into ``out``. ``elastic``: one shared checkpoint folder,
    resumed from; ``kill``: (rank, step) at which that rank dies in the first attempt."""
    info = init_distributed(torch.device(device))  # the Trainer's own call returns this info
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    folder = out / ("checkpoints" if elastic else f"checkpoints_rank{info.rank}")
    config = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,  # global: each of the W ranks reads batch_size / W per step
        grad_accum_steps=grad_accum,  # ... in grad_accum micro-batches
        lr=1e-2,
        device=device,  # "cuda": one GPU per rank, NCCL
        seed=SEED,
        shuffle=True,
        progress=False,
        checkpoint_dir=folder,
        checkpoint_every=checkpoint_every,
    )
    trainer = Trainer(make_model(), config, make_data(ignore_fraction))
    no_sync_calls = 0
    if trainer._ddp is not None:  # count the backward passes that skip the gradient all-reduce
        no_sync = trainer._ddp.no_sync

        def counting_no_sync():
            nonlocal no_sync_calls
            no_sync_calls += 1
            return no_sync()

        trainer._ddp.no_sync = counting_no_sync
    if kill is not None and attempt == 0 and info.rank == kill[0]:
        take_step = trainer._train_step

        def dying_step() -> dict:
            if trainer.step + 1 == kill[1]:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no goodbye: a lost machine
            return take_step()

        trainer._train_step = dying_step
    resume_from = latest_checkpoint(folder) if elastic else None
    print(f"rank {info.rank} attempt {attempt}: resuming from {resume_from}", flush=True)
    history = trainer.fit(resume_from=resume_from)
    torch.save(
        {
            "state_dict": trainer.model.state_dict(),
            "losses": history["train_loss"].tolist(),
            "no_sync_calls": no_sync_calls,
        },
        out / f"rank{info.rank}.pt",
    )
    cleanup(info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder for rank{r}.pt and the checkpoints")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--elastic", action="store_true", help="shared folder, resume from it")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--ignore-fraction", type=float, default=0.0)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    kill = None if args.kill_rank is None else (args.kill_rank, args.kill_at_step)
    train(
        args.out,
        args.steps,
        args.batch_size,
        args.device,
        elastic=args.elastic,
        checkpoint_every=args.checkpoint_every,
        kill=kill,
        ignore_fraction=args.ignore_fraction,
        grad_accum=args.grad_accum,
    )


if __name__ == "__main__":
    main()
