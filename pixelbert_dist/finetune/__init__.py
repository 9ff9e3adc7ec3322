"""Fine-tuning on VQA 2.0, NLVR2 and image-text retrieval.

Model-free pieces live here, importable without torch models or DeepSpeed:
``vqa_data`` (official VQA files, normalisation, accuracy, answer vocabulary, soft targets),
``nlvr2_data`` (official NLVR2 jsonl), ``retrieval_metrics`` (Karpathy split, recall@K,
hardest negatives) and ``synthetic_tasks`` (small tasks in the official formats, made from
the synthetic pre-training shards). Import the submodules directly.
"""
