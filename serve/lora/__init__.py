"""LoRA for Wan transformers: read safetensors in the original (Lightning/LightX2V) or diffusers/PEFT
key format, check them against the expert they target, then fuse into the weights at load or
apply per request (rows of a batch carry their own LoRA set).

Import the submodules directly: `paths` is torch-free so the API process can check LoRA names
against the configured directories without importing torch.
"""
