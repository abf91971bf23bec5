"""The continuous-batching engine: sequences, paged KV bookkeeping, the step scheduler,
the model runner that owns the KV tensors, the engine loop and its background thread.

sequence / kv_pages / scheduler are pure Python over page ids and token ids; the model
runner turns a step plan into executor calls over the paged KV pool.
"""

from .background import BackgroundEngine, RequestStream
from .kv_pages import PAGE_SIZE, PageCopy, PageManager
from .llm_engine import Completion, Engine, EngineConfig, RequestOutput
from .model_runner import ModelRunner, pool_pages
from .scheduler import PrefillChunk, QueueFullError, Scheduler, SchedulerConfig, StepOutput, StepPlan
from .sequence import Sequence, SequenceStatus

__all__ = [
    "PAGE_SIZE",
    "BackgroundEngine",
    "Completion",
    "Engine",
    "EngineConfig",
    "ModelRunner",
    "PageCopy",
    "PageManager",
    "PrefillChunk",
    "QueueFullError",
    "RequestOutput",
    "RequestStream",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceStatus",
    "StepOutput",
    "StepPlan",
    "pool_pages",
]
