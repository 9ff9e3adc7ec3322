"""What the console says about a run's numbers: the learning rates under the config keys
that set them (the real optimisers' groups), and the closing summary's best: line with
scores only (a real RunLogger's record)."""

from __future__ import annotations

from pixelbert_dist.console import best_line, learning_rates_shown
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.heads import VqaModel
from pixelbert_dist.finetune.trainer import build_optimizer as finetune_optimizer
from pixelbert_dist.metrics import RunLogger
from pixelbert_dist.model.presets import build_model
from pixelbert_dist.train.config import OptimConfig
from pixelbert_dist.train.optim import build_optimizer


def _logged_rates(optimizer) -> dict:
    """The ``lr_<group>`` values a train log row holds (BaseTrainer._log_train)."""
    return {f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}


def test_pretraining_shows_the_cnn_and_the_transformer_rate_labelled():
    optimizer = build_optimizer(build_model("tiny"), OptimConfig(cnn_lr=1e-2, lr=1e-4))
    assert learning_rates_shown(_logged_rates(optimizer)) == {"cnn_lr": "1.00e-02", "lr": "1.00e-04"}


def test_finetuning_shows_the_heads_rate_too():
    cfg = FinetuneConfig()  # optim.cnn_lr 1e-3, optim.lr 5e-5
    cfg.train.head_lr_mult = 10.0
    model = VqaModel(build_model("tiny"), num_answers=7)
    shown = learning_rates_shown(_logged_rates(finetune_optimizer(model, cfg)))
    assert shown == {"cnn_lr": "1.00e-03", "lr": "5.00e-05", "head_lr": "5.00e-04"}


def test_best_line_reports_the_score_at_its_best_step_not_counts(tmp_path):
    logger = RunLogger(tmp_path, enabled=True)
    logger.log(10, "val", {"overall": 41.5, "num_questions": 600})
    logger.log(20, "val", {"overall": 47.25, "num_questions": 600})
    logger.log(30, "val", {"overall": 44.0, "num_questions": 600})
    logger.log(30, "test", {"num_questions": 900})  # a test split: no answers, a count only
    logger.close()
    assert best_line(logger.best(), ["overall"]) == "  best: val/overall=47.25 (step 20)"
    assert best_line(logger.best(), []) is None
