"""Training: the Trainer, the hybrid optimiser and the learning-rate schedules.

Kept free of imports so ``import pixelbert_dist.train.optim`` pulls in nothing else.
"""
