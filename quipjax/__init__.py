"""quipjax: QuIP# (randomized Hadamard incoherence, E8P lattice codebooks, BlockLDLQ) in JAX."""
__version__ = "0.1.0"
