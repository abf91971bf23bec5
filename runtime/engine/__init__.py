"""The continuous-batching engine: sequences, paged KV bookkeeping, the step scheduler.

Pure Python over page ids and token ids; the model runner owns the tensors.
"""

from .kv_pages import PAGE_SIZE, PageCopy, PageManager
from .scheduler import PrefillChunk, QueueFullError, Scheduler, SchedulerConfig, StepOutput, StepPlan
from .sequence import Sequence, SequenceStatus

__all__ = [
    "PAGE_SIZE",
    "PageCopy",
    "PageManager",
    "PrefillChunk",
    "QueueFullError",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceStatus",
    "StepOutput",
    "StepPlan",
]
