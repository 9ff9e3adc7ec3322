"""pixelbert_dist: distributed pre-training of Pixel-BERT (Huang et al., 2020)."""

__version__ = "0.1.0"
