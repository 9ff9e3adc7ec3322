"""DataConfig: what the image loaders read and how (the batch size lives in the trainer).

Each field carries its help and bounds (``pixelbert_dist.config``: ``Help``, ``Ge``...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Interval

from pixelbert_dist.config import ConfigError, Help, check_fields

Backend = Literal["dali", "nvjpeg", "pil"]  # see pixelbert_dist.data.loader
DaliReader = Literal["external", "webdataset"]
Probability = Interval(ge=0, le=1)


@dataclass
class DataConfig:
    train_shards: Annotated[
        str,
        Help(
            "the training split: a directory with manifest.json (launch/make_shards.py), "
            'or streamed tars: "https://host/x-{000000..000099}.tar", "pipe:CMD"'
        ),
    ] = ""
    val_shards: Annotated[
        str | None, Help("the validation split, in the same forms as data.train_shards; null: no validation")
    ] = None
    backend: Annotated[Backend, Help("image decoding: DALI, nvjpeg on the GPU, or PIL in DataLoader workers")] = "dali"
    dali_reader: Annotated[
        DaliReader,
        Help(
            "data.backend=dali only: 'external' feeds DALI from the shared epoch plan (decode/dali.py); "
            "'webdataset' uses DALI's own reader + pipeline checkpoints (readers/dali_wds.py)"
        ),
    ] = "external"
    image_shorter: Annotated[int, Help("shorter image side (paper: 800 for R50, 600 for X152)"), Ge(1)] = 800
    image_max: Annotated[int, Help("cap on the longer side (paper: 1333 / 1000); >= data.image_shorter"), Ge(1)] = 1333
    hflip: Annotated[bool, Help("p=0.5 horizontal flip, swapping left/right in the caption")] = False
    bucketing: Annotated[bool, Help("group similar aspect ratios into batches to cut padding")] = False
    bucket_window: Annotated[int, Help("bucketing sorts within windows of this many batches"), Ge(1)] = 16
    vocab_dir: Annotated[str | None, Help("tokenizer folder (a BERT checkpoint's); null: the shipped vocab")] = None
    caption_key: Annotated[
        str,
        Help(
            "where a sample's caption is (format/members.py): 'txt' = the KEY.txt member, else the "
            "JSON's caption / captions; any other value: that field of the JSON"
        ),
    ] = "txt"
    max_text_len: Annotated[int, Help("captions are cut to this many tokens, [CLS] and [SEP] included"), Ge(3)] = 40
    mlm_prob: Annotated[float, Help("fraction of caption tokens masked for MLM"), Probability] = 0.15
    itm_neg_prob: Annotated[float, Help("chance a pair gets another image's caption (ITM negative)"), Probability] = 0.5
    num_workers: Annotated[int, Help("PIL worker processes / DALI threads"), Ge(0)] = 2
    prefetch: Annotated[int, Help("batches prefetched per worker (PIL) / queue depth (DALI)"), Ge(1)] = 2
    seed: Annotated[int, Help("sample order, caption choice, flips and MLM/ITM draws"), Ge(0)] = 0
    shuffle: Annotated[bool, Help("shuffle the training samples every epoch")] = True
    shard_window: Annotated[
        int,
        Help(
            "train only: shuffle samples within windows of this many shards (their order shuffled "
            "too), so each rank reads shards in runs; 0: one global shuffle"
        ),
        Ge(0),
    ] = 16
    drop_last: Annotated[bool, Help("train only: drop the epoch's tail instead of wrapping around")] = False
    # streaming mode only (data/readers/stream.py)
    epoch_samples: Annotated[
        int, Help("streamed shards: samples in one epoch over all ranks (required there)"), Ge(0)
    ] = 0
    resampled: Annotated[bool, Help("streamed shards: draw shards with replacement (fixed-size epochs)")] = False
    shuffle_buffer: Annotated[int, Help("streamed shards: shuffle buffer, in samples per worker"), Ge(0)] = 1000
    shards_in_flight: Annotated[
        int,
        Help(
            "streamed shards, training: shards each worker reads at once, one sample from each in "
            "turn, so ~1/N of in-batch pairs share a shard (readers/stream_mix.py); 1: one at a time"
        ),
        Ge(1),
    ] = 16
    stream_retries: Annotated[int, Help("streamed shards: reopen a failed shard this often, with back-off"), Ge(0)] = 3

    def validate(self) -> "DataConfig":
        """Types and bounds (also for a config made in Python), then what spans two keys."""
        check_fields(self, "data.")
        if self.image_max < self.image_shorter:
            raise ConfigError(
                f"data.image_shorter={self.image_shorter} / data.image_max="
                f"{self.image_max}: need image_shorter <= image_max"
            )
        if self.dali_reader == "webdataset" and self.backend != "dali":
            raise ConfigError(
                f"data.dali_reader='webdataset' is a mode of data.backend='dali', "
                f"not of {self.backend!r}: set data.dali_reader='external' with it"
            )
        if self.dali_reader == "webdataset" and self.bucketing:
            raise ConfigError(
                "data.bucketing needs the epoch plan: it works with data.dali_reader='external', not 'webdataset'"
            )
        return self
