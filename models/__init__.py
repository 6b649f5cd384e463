"""Networks: the diffusion UNet, the fine-grained metadata condition embedder, text encoders and LoRA."""
