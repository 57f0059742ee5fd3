"""The job: quantize a model from a checkpoint on disk, resumably (experiments/quantize.py).

settings (the run's dataclasses and their flags) · data (calibration and evaluation text) ·
calibration (the calibration windows: wiki, the shipped mix or the user's files) ·
checkpoint (the on-disk layout; `Reader` applies the end-to-end overrides) · build (the one
model builder from a checkpoint) · activations (block inputs on disk) · hessians (Hessian
collection) · quantization (the one quantization loop) · tuning (in-block and end-to-end
fine-tuning) · evaluate (perplexity) · plan (memory and time of a run, dry) · curves
(fine-tuning plots) · run (the job as a sequence of stages).
"""
