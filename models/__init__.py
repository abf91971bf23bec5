"""Model definitions in plain torch. Imports torch only."""

from .config import ModelConfig, RopeConfig
from .layers import CausalLM
from .llama import Llama
from .qwen3 import Qwen3
from .qwen3_5 import Qwen3_5, Qwen3_5Moe
from .qwen3_moe import Qwen3Moe

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": Llama,
    "qwen3": Qwen3,
    "qwen3_moe": Qwen3Moe,
    "qwen3_5": Qwen3_5,
    "qwen3_5_moe": Qwen3_5Moe,
}


def build_model(config: ModelConfig) -> CausalLM:
    return ARCHITECTURES[config.architecture](config)


__all__ = ["ARCHITECTURES", "CausalLM", "ModelConfig", "RopeConfig", "build_model"]
