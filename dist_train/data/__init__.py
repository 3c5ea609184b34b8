"""The data layer: shard index and reader, the plan and global order, clips, batches and loaders.

    plan.py     which samples train / validate / test, the layout of the global batch, each epoch's order
    reader.py   the one reader of shards: index-checked byte ranges, bad-sample records
    cache.py    shards in object storage: the manifest and its store, a node-local cache of whole shards
    remote.py   object storage itself: ranged reads with deadlines and retries, secrets kept out of sight
    clips.py    JPEG header checks, decoding, crops and flips, the model's input
    batches.py  batches in shared memory and their hand-off to the training process
    device.py   a batch on the training device (copied out of its buffer, or decoded there)
    loaders.py  the DataLoaders of a rank's training micro-batches and of its share of a split

The rest of the code imports what it needs from here.
"""

from dist_train.data.batches import Batch, BatchFiller, SampleSpec, parse_sample
from dist_train.data.cache import CachedShards, cache_note, open_manifest
from dist_train.data.clips import (
    CROPS,
    IMAGENET_STATS,
    KINETICS_STATS,
    MAX_FRAME_PIXELS,
    ClipTransform,
    clip_batch,
    decode_jpegs,
    frame_size,
    jpeg_size,
    make_clip,
    normalization,
    to_model_input,
)
from dist_train.data.device import Clips, materialize
from dist_train.data.loaders import EvalStream, TrainStream, eval_loader, train_loader, waited_for, watched
from dist_train.data.plan import (
    DataPlan,
    Layout,
    Samples,
    data_digest,
    eval_share,
    hold_out,
    make_plan,
    mix_seed,
    resolve_layout,
    resolve_workers,
    validation_note,
)
from dist_train.data.reader import (
    BadDataError,
    LocalShards,
    SampleError,
    ShardReader,
    bad_record,
    iter_unindexed,
    read_split,
    store_of,
    verify_shards,
)
from dist_train.data.remote import RemoteError

__all__ = [
    "CROPS", "IMAGENET_STATS", "KINETICS_STATS", "MAX_FRAME_PIXELS", "bad_record", "cache_note", "BadDataError",
    "Batch", "BatchFiller", "CachedShards", "clip_batch", "Clips", "ClipTransform", "data_digest", "DataPlan",
    "decode_jpegs", "eval_loader", "eval_share", "EvalStream", "frame_size", "hold_out", "iter_unindexed",
    "jpeg_size", "Layout", "LocalShards", "make_clip", "make_plan", "materialize", "mix_seed", "normalization",
    "open_manifest", "parse_sample", "read_split", "RemoteError", "resolve_layout", "resolve_workers",
    "SampleError", "Samples", "SampleSpec", "ShardReader", "store_of", "to_model_input", "train_loader",
    "TrainStream", "validation_note", "verify_shards", "waited_for", "watched",
]
