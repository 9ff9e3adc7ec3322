"""Training: the one DeepSpeed loop (``loop.BaseTrainer``) and pre-training on it
(``trainer.Trainer``), the run config (``config``: ``LoopConfig``, ``OptimConfig``,
``ScheduleConfig``, ``RunConfig``), the hybrid optimiser, the learning-rate schedules,
evaluation and recall@K.

Kept free of imports: ``import pixelbert_dist.train.X`` loads X and what X needs only.
"""
