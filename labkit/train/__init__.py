"""Training: the loop and everything it is made of.

``trainer`` (the ``Trainer``; ``labkit.viz.plot_training_curves`` draws its history),
``config`` (``TrainConfig``: settings, optimizer and learning-rate schedule), ``schedules``
(constant, cosine and Noam schedules), ``losses`` (summed cross-entropy, accuracy,
``IGNORE_INDEX``), ``checkpoints`` (checkpoint files written atomically and checked when read,
RNG state), ``interrupts`` (Ctrl-C and SIGTERM stop at a step boundary), ``memory`` (activation
checkpointing and what it saves), ``distributed`` (data-parallel training under
``torchrun``) and ``parallel`` (model parallelism: tensor-parallel MLP and attention, FSDP,
per-rank memory). Every name is re-exported here,
e.g. ``from labkit.train import Trainer, TrainConfig``.
"""

from labkit.train.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    capture_rng_state,
    checkpoint_path,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from labkit.train.config import (
    PRECISIONS,
    TrainConfig,
    make_optimizer,
    make_scheduler,
    param_groups,
    schedule_lr,
)
from labkit.train.distributed import (
    DistributedInfo,
    TorchrunError,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    local_device,
    make_sampler,
    run_torchrun,
    torchrun_command,
    unwrap_model,
    wrap_model,
)
from labkit.train.interrupts import StopRequests, TrainingInterrupted
from labkit.train.losses import (
    IGNORE_INDEX,
    accuracy,
    cross_entropy_sum,
    output_logits,
    split_batch,
)
from labkit.train.memory import enable_activation_checkpointing, saved_activation_bytes
from labkit.train.parallel import (
    device_mesh,
    full_state_dict,
    fully_shard_model,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
    tensor_parallel_attention,
    tensor_parallel_mlp,
)
from labkit.train.schedules import constant_lr, cosine_lr, noam_lr
from labkit.train.trainer import HISTORY_COLUMNS, Trainer

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "DistributedInfo",
    "HISTORY_COLUMNS",
    "IGNORE_INDEX",
    "PRECISIONS",
    "StopRequests",
    "TorchrunError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "accuracy",
    "all_reduce_mean",
    "barrier",
    "capture_rng_state",
    "checkpoint_path",
    "checkpoint_step",
    "cleanup",
    "constant_lr",
    "cosine_lr",
    "cross_entropy_sum",
    "device_mesh",
    "enable_activation_checkpointing",
    "full_state_dict",
    "fully_shard_model",
    "gradient_bytes",
    "init_distributed",
    "latest_checkpoint",
    "list_checkpoints",
    "local_device",
    "make_optimizer",
    "make_sampler",
    "make_scheduler",
    "noam_lr",
    "optimizer_state_bytes",
    "output_logits",
    "param_groups",
    "parameter_bytes",
    "prune_checkpoints",
    "read_checkpoint",
    "restore_rng_state",
    "run_torchrun",
    "saved_activation_bytes",
    "schedule_lr",
    "split_batch",
    "tensor_parallel_attention",
    "tensor_parallel_mlp",
    "torchrun_command",
    "unwrap_model",
    "wrap_model",
    "write_checkpoint",
]
