"""DataConfig: what the image loaders read and how (the batch size lives in the trainer)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("dali", "nvjpeg", "pil")
DALI_READERS = ("external", "webdataset")


@dataclass
class DataConfig:
    train_shards: str = ""  # split directory with manifest.json (launch/make_shards.py),
    #                                     or streamed: "https://host/x-{000000..000099}.tar", "pipe:CMD"
    val_shards: str | None = None
    backend: str = "dali"  # dali | nvjpeg | pil  (see pixelbert_dist.data.loader)
    # backend=dali only: "external" feeds DALI from the shared epoch plan (dali.py);
    # "webdataset" uses DALI's own reader + pipeline checkpoints (dali_wds.py)
    dali_reader: str = "external"
    image_shorter: int = 800  # paper: 800 for ResNet-50, 600 for ResNeXt-152
    image_max: int = 1333  # paper: 1333 / 1000
    hflip: bool = False  # p=0.5 flip, swapping left/right in the caption
    bucketing: bool = False  # group similar aspect ratios to cut padding
    bucket_window: int = 16  # bucketing sorts within windows of this many batches
    vocab_dir: str | None = None  # None: the shipped synthetic vocab
    # where a sample's caption is (format/members.py): "txt" = the KEY.txt member, else the
    # .json's "caption" / "captions"; any other value: that field of the .json
    caption_key: str = "txt"
    max_text_len: int = 40
    mlm_prob: float = 0.15
    itm_neg_prob: float = 0.5
    num_workers: int = 2  # PIL worker processes / DALI threads
    prefetch: int = 2  # batches prefetched per worker (PIL) / queue depth (DALI)
    seed: int = 0
    shuffle: bool = True
    # train only: samples are shuffled within windows of this many shards (the shards'
    # order is shuffled too) so each rank reads shards in runs; 0: one global shuffle
    shard_window: int = 16
    drop_last: bool = False  # train only: drop the epoch's tail instead of wrapping
    # streaming mode only (data/readers/stream.py)
    epoch_samples: int = 0  # samples in one epoch over all ranks (required there)
    resampled: bool = False  # draw shards with replacement (fixed-size epochs)
    shuffle_buffer: int = 1000  # samples per worker
    stream_retries: int = 3  # reopen a failed shard this often, with back-off

    def validate(self) -> "DataConfig":
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend={self.backend!r}: choose one of {list(BACKENDS)}")
        self._validate_dali_reader()
        if self.image_shorter < 1 or self.image_max < self.image_shorter:
            raise ValueError(
                f"data.image_shorter={self.image_shorter} / data.image_max="
                f"{self.image_max}: need 1 <= image_shorter <= image_max"
            )
        if self.epoch_samples < 0 or self.shuffle_buffer < 0 or self.stream_retries < 0:
            raise ValueError("data.epoch_samples, data.shuffle_buffer and data.stream_retries must be >= 0")
        if self.num_workers < 0 or self.prefetch < 1 or self.bucket_window < 1:
            raise ValueError("data.num_workers must be >= 0, data.prefetch and data.bucket_window >= 1")
        if self.shard_window < 0:
            raise ValueError(f"data.shard_window={self.shard_window}: must be >= 0 (0: one global shuffle)")
        return self

    def _validate_dali_reader(self) -> None:
        if self.dali_reader not in DALI_READERS:
            raise ValueError(f"data.dali_reader={self.dali_reader!r}: choose one of {list(DALI_READERS)}")
        if self.dali_reader == "webdataset" and self.backend != "dali":
            raise ValueError(
                f"data.dali_reader='webdataset' is a mode of data.backend='dali', "
                f"not of {self.backend!r}: set data.dali_reader='external' with it"
            )
        if self.dali_reader == "webdataset" and self.bucketing:
            raise ValueError(
                "data.bucketing needs the epoch plan: it works with data.dali_reader='external', not 'webdataset'"
            )
