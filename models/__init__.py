"""Model definitions in plain torch. Imports torch only."""

from .config import ModelConfig, RopeConfig
from .layers import CausalLM
from .llama import Llama
from .qwen3 import Qwen3

ARCHITECTURES: dict[str, type[CausalLM]] = {"llama": Llama, "qwen3": Qwen3}


def build_model(config: ModelConfig) -> CausalLM:
    return ARCHITECTURES[config.architecture](config)


__all__ = ["ARCHITECTURES", "CausalLM", "ModelConfig", "RopeConfig", "build_model"]
