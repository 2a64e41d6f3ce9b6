"""Real architectures without weights: the published denoiser configs, the builders (meta device, reduced
depth) and the tiny random-weight pipeline zoo that tests and benchmarks load with ``from_pretrained``."""
