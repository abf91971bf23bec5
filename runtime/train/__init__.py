"""Training on arle models: SFT (full or LoRA), evaluation, pretraining; checkpoints in HF layout."""
