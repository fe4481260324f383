"""jaxlm: the ChatGPT training pipeline (tokenizer, pretraining, SFT, reward model, PPO, DPO) in JAX."""

__version__ = "0.1.0"
