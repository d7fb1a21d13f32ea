"""Fine-tuning inside the ComfyUI graph: DreamBooth with prior preservation, and B-LoRA.

objectives.py  the losses and prediction targets (pure torch, no comfy import)
targets.py     which weights get a LoRA: attention projections of chosen blocks, B-LoRA presets
lora_file.py   kohya-style LoRA state dicts, atomic saving under models/loras, B-LoRA parts
trainer.py     the training loop on a ModelPatcher clone (core weight adapters and sampling)
loss_curve.py  the loss-curve image
"""
