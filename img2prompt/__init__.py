"""img2prompt: recover a Stable-Diffusion prompt embedding by CLIP retrieval over a prompt corpus."""

__version__ = "0.1.0"
