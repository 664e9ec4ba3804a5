"""The model a run trains, built from its config through the architecture registry (presets, size knobs, a
pretrained checkpoint, LoRA), its AdamW groups, and its tokenizer."""
