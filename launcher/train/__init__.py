"""The training core: the loop (``loop.train``), one optimizer step, the side jobs, the DeepSpeed engine, the
tasks (language modelling, image and text classification), checkpoints and the HF export."""
