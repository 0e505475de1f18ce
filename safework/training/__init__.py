"""The training core: one loop, one jitted step, checkpoints, preemption, metrics, the work directory's rules."""

from safework.training.checkpoints import CheckpointMismatchError, CheckpointSaveError, Checkpointer
from safework.training.guard import TrainingDiverged
from safework.training.loop import BatchSource, StepBatch, StepSource, Trainer, TrainSettings
from safework.training.metrics import read_metrics
from safework.training.preemption import Preempted
from safework.training.state import TrainState, abstract_of, abstract_state, new_state
from safework.training.step import Objective, make_train_step

__all__ = ["BatchSource", "CheckpointMismatchError", "CheckpointSaveError", "Checkpointer", "Objective", "Preempted",
           "StepBatch", "StepSource", "TrainSettings", "TrainState", "Trainer", "TrainingDiverged", "abstract_of",
           "abstract_state", "make_train_step", "new_state", "read_metrics"]
