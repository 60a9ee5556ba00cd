"""Models: loading (builtins, diffusers folders, single files, identity), text conditioning, LoRA,
the offline CLIP vocabulary."""
