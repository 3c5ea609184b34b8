"""The trainer's one config: a dataclass, its command line and its optional YAML/TOML/JSON file
(read by ``dist_train.config_files``).

Precedence: command-line flags > config file (``--config FILE``) > the dataclass defaults.
Every field is a flag (``hidden_size`` -> ``--hidden-size``; booleans also take ``--no-...``),
and a config file uses the field names (dashes or underscores). ``config.json`` in a run folder is a
valid config file, so ``--config runs/exp1/config.json`` repeats a run.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dist_train.config_files import read_config_file
from dist_train.locations import CACHE_DIR_HELP, CACHE_SIZE_HELP, check_url, parse_size, public

# The one list of each choice (config.py imports no torch, so --help and config errors stay fast):
MODEL_NAMES = ("cnn_rnn", "r3d_18", "mc3_18", "r2plus1d_18")  # models.build_model builds each
TRAIN_CROPS = ("random", "resized")  # data.ClipTransform's crops
RNNS = ("lstm", "gru")  # cnn_rnn's recurrent layer
HEADS = ("last", "mean")  # what cnn_rnn classifies
LOG_LEVELS = ("debug", "info", "warning", "error")


# Largest accepted value of each field that has one: past these a value can only be a mistake (a digit
# too many, pixels for frames, seconds for minutes), and such a value would otherwise surface late, as an
# out-of-memory error, an overflow or a run that never ends. Each is far beyond what HMDB51/Kinetics runs use.
LIMITS: dict[str, tuple[int | float, str]] = {
    "img_size": (1024, "pixels; video models train on 112-320 pixel clips"),
    "workers": (256, "more loader processes per training process than any node has cores"),
    "shuffle_window": (1_000_000, "shards; more than any shard set holds"),
    "test_every": (100_000, "epochs, the most --epochs takes"),
    "hidden_size": (16_384, "the RNN's weights grow with its square: 16384 is over 10^9 parameters"),
    "rnn_layers": (64, "stacked RNN layers; video models use 1-4"),
    "epochs": (100_000, "training epochs"),
    "global_batch": (1_048_576, "clips per step; more than the clips of any video data set"),
    "batch_size": (65_536, "clips per process per micro-batch; far beyond any accelerator's memory"),
    "accum_steps": (65_536, "micro-batches per optimizer step"),
    "warmup_epochs": (100_000, "epochs, the most --epochs takes"),
    "plateau_patience": (100_000, "epochs, the most --epochs takes"),
    "seed": (2**32 - 1, "torch takes 64-bit seeds and each rank seeds with seed * 1000 + rank"),
    "wandb_init_timeout": (86_400, "seconds (a day)"),
    "data_timeout": (604_800, "seconds (a week); 0 waits forever"),
    "stop_timeout": (86_400, "seconds (a day)"),
    "dist_timeout": (604_800, "seconds (a week): longer than any job's time limit"),
    "fetch_timeout": (86_400, "seconds (a day)"),
    "fetch_retries": (1_000, "retries; at 30 s apart, over 8 hours"),
}
# Fields where a huge value has a plain meaning and is left alone: --log-every, --ckpt-every-steps and
# --ckpt-every-minutes (never, but at epoch ends), --keep-last (keep all).


def _f(default: Any, help: str, choices: tuple | None = None, parse=None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


def _workers(value: Any) -> int | str:
    """``--workers``: ``auto`` or a non-negative integer (from a flag's text or a config file)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"--workers must be auto or an integer >= 0, got {value!r}")
    return int(value)


@dataclass
class TrainConfig:
    """Everything a training run needs; checked on creation with errors that say what to change."""

    # data and run folder
    shards: str = _f("shards", "shard folder holding manifest.json (made by python -m preprocess.shard), or its URL: "
                               "s3://bucket/prefix/ (any S3-compatible store; endpoint and keys from AWS_ENDPOINT_URL, "
                               "AWS_ACCESS_KEY_ID, ... or ~/.aws), gs://bucket/prefix/ or https://host/prefix/ (a "
                               "query string, e.g. a token, is added to every request and never saved or shown)")
    cache_dir: str | None = _f(None, CACHE_DIR_HELP)
    cache_size: str = _f("auto", CACHE_SIZE_HELP)
    fetch_timeout: float = _f(60.0, "seconds one request for a remote shard may take before it is retried")
    fetch_retries: int = _f(8, "retries of a failed request for a remote shard, waiting 0.5 s doubling to 30 s "
                               "between them (8: about 1.5 minutes of outage are ridden out)")
    out: str = _f("", "run folder for checkpoints, logs, metrics.jsonl, plots and results.json (required)")
    img_size: int = _f(112, "clip size in pixels (square crops of the stored frames)")
    train_crop: str = _f("random", "training crop, the same for every frame of a clip: random (a square of 7/8 of the "
                                   "short side resized to img-size, a plain crop for 112 on the default 128-pixel "
                                   "frames; evaluation takes the centre one: torchvision's video recipe, the fastest) "
                                   "or resized (random resized crop, area --crop-scale..1, aspect 3/4..4/3; evaluation "
                                   "resizes the short side to img-size, then centre-crops)",
                         TRAIN_CROPS)
    crop_scale: float = _f(0.5, "smallest area fraction of the random resized crop (--train-crop resized)")
    hflip: bool = _f(True, "random horizontal flip of whole clips; turn off when classes depend on left/right "
                           "direction")
    workers: int | str = _f("auto", "DataLoader worker processes per training process (0 = load in the main process); "
                                    "auto = the CPUs this process may use (affinity, SLURM_CPUS_PER_TASK) shared by "
                                    "the processes on the node, less one, between 1 and 16", parse=_workers)
    temporal_jitter: bool = _f(True, "with shards of K > 1 frames per segment (preprocess.shard --temporal-views K): "
                                     "each training clip takes one of each segment's K frames at random, seeded "
                                     "like the crops (a resume stays exact); --no-temporal-jitter takes the middle "
                                     "one. Evaluation averages the K temporal views")
    shuffle_window: int = _f(16, "shards whose samples are shuffled together (the order also permutes the shards): "
                                 "larger mixes more, smaller reads fewer shards at a time")
    decode: str = _f("cpu", "where JPEG frames are decoded: cpu (in the DataLoader workers) or gpu (batched nvjpeg in "
                            "the training process, CPU fallback). gpu was measured slower than cpu on the one GPU it "
                            "ran on (H200 with 12 loader workers: 494-794 vs 1,405-1,741 clips/s): try it only when "
                            "CPU cores, not the GPU, limit the loading", ("cpu", "gpu"))
    on_bad_sample: str = _f("skip", "a corrupt sample or truncated shard: skip it and count it (logged with the "
                                    "shard name) or stop with an error naming the shard", ("skip", "error"))
    val_fraction: float = _f(0.1, "fraction of the training clips held out as the validation set that selects best.pt "
                                   "(top-1, ties to the lower loss): stratified by class, or whole source films when "
                                   "the shards were split by film; never more clips than the fraction asks; "
                                   "0 = no validation set, best.pt is the final model")
    verify_shards: bool = _f(False, "check every shard's and index's sha256 against manifest.json before training "
                                    "(reads all data once); a mismatch is a bad shard (see --on-bad-sample)")
    trace_samples: bool = _f(False, "write OUT/samples.jsonl: the keys each rank trained on in each optimizer step")
    test_every: int = _f(1, "also evaluate the test split every N epochs for the curves (0 = only at the end; "
                            "never used for model selection)")
    # model
    model: str = _f("cnn_rnn", "model architecture", MODEL_NAMES)
    pretrained: str | None = _f(None, "pretrained weights: imagenet (cnn_rnn), kinetics (3D CNNs) or a state-dict "
                                      "path; read from the torch hub cache, never downloaded")
    freeze_trunk: bool = _f(False, "freeze the backbone (train only the RNN and head / the final layer)")
    trunk_lr_scale: float = _f(1.0, "learning-rate multiplier for the backbone (e.g. 0.1 for a pretrained trunk)")
    rnn: str = _f("lstm", "recurrent layer of cnn_rnn", RNNS)
    hidden_size: int = _f(256, "RNN hidden size (cnn_rnn)")
    rnn_layers: int = _f(1, "stacked RNN layers (cnn_rnn)")
    bidirectional: bool = _f(False, "bidirectional RNN (cnn_rnn)")
    dropout: float = _f(0.0, "dropout before the classifier (and between stacked RNN layers)")
    head: str = _f("last", "cnn_rnn classifies the last RNN state or the temporal mean of the outputs", HEADS)
    # optimisation
    epochs: int = _f(30, "training epochs")
    global_batch: int | None = _f(None, "clips per optimizer step over all processes, split over them (each takes "
                                        "global-batch / processes clips as micro-batches of at most --batch-size, "
                                        "accumulating the rest), so one command fits any number of processes that "
                                        "divides it; default: batch-size x accum-steps x processes at a fresh start, "
                                        "the checkpoint's on resume")
    batch_size: int = _f(8, "clips per process per micro-batch (the most, with --global-batch)")
    accum_steps: int = _f(1, "micro-batches accumulated (without gradient all-reduce) per optimizer step "
                             "(derived from --global-batch when it is given)")
    optimizer: str = _f("adamw", "optimizer", ("adamw", "sgd"))
    lr: float = _f(3e-4, "peak learning rate")
    weight_decay: float = _f(0.01, "weight decay")
    momentum: float = _f(0.9, "SGD momentum (Nesterov)")
    scheduler: str = _f("cosine", "LR schedule: linear warmup then cosine decay per step; ReduceLROnPlateau on "
                                  "validation loss per epoch; or warmup then constant",
                        ("cosine", "plateau", "constant"))
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs (cosine and constant schedules)")
    min_lr_ratio: float = _f(0.01, "final learning rate of the cosine schedule as a fraction of --lr")
    plateau_factor: float = _f(0.5, "ReduceLROnPlateau: factor applied to the LR")
    plateau_patience: int = _f(2, "ReduceLROnPlateau: epochs without improvement before the LR drops")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy loss")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = off)")
    precision: str = _f("auto", "fp32, bf16 or fp16 (autocast; fp16 uses a GradScaler); auto = bf16 on CUDA GPUs "
                                "that support it, else fp32", ("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _f(True, "channels-last memory format for the convolutions")
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(0, "random seed (model init; the data order, the validation hold-out and the augmentation "
                      "derive from it, the same for any number of processes and loader workers)")
    # checkpoints and restarts
    resume: str = _f("auto", "auto: continue from the newest valid checkpoint in --out if any; never: start fresh "
                             "(refuses a folder with checkpoints unless --overwrite); or a checkpoint PATH")
    overwrite: bool = _f(False, "with --resume never: allow starting over in a run folder that holds checkpoints")
    ckpt_every_steps: int = _f(0, "also save last.pt every N optimizer steps (0 = only at epoch ends and on stop)")
    ckpt_every_minutes: float = _f(15.0, "also save last.pt when this many minutes passed since the last save "
                                         "(0 = off)")
    keep_last: int = _f(3, "step checkpoints kept in OUT/checkpoints/ (last.pt always points at the newest)")
    # logging
    wandb: str = _f("auto", "Weights & Biases mode; auto = online when credentials exist, else offline",
                    ("auto", "online", "offline", "disabled"))
    wandb_project: str = _f("vidshard", "W&B project")
    wandb_entity: str | None = _f(None, "W&B entity (team or user); default: the account's default")
    wandb_init_timeout: float = _f(30.0, "seconds W&B online may take to start before falling back to offline")
    run_name: str | None = _f(None, "run name shown in W&B (default: the name of the --out folder)")
    log_level: str = _f("info", "messages of rank 0 at this level and above (to stderr, through Python's logging "
                                "module: the logger is named dist_train)", LOG_LEVELS)
    log_level_others: str = _f("warning", "the same for the other ranks (their lines name the rank)", LOG_LEVELS)
    log_every: int = _f(10, "log training metrics every N optimizer steps")
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    data_timeout: float = _f(600.0, "seconds to wait for one batch from the loader workers before failing with the "
                                    "shards of that batch named (0 = wait forever)")
    stop_timeout: float = _f(30.0, "after a stop signal, seconds to wait for the next batch before exiting at once "
                                   "without a new checkpoint (the data is stuck); a second signal exits at once")
    dist_timeout: float = _f(600.0, "seconds a collective may wait before the process group reports a hang")

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, str) and self.pretrained.lower() in ("", "none"):
            self.pretrained = None
        self.workers = _workers(self.workers)
        for f in fields(self):
            _check_field(self, f)
        parse_size(self.cache_size)  # these two: ValueError with what to change
        check_url(self.shards)
        checks = [
            (self.out != "", "--out is required: the run folder for checkpoints and logs (e.g. --out runs/exp1)"),
            (self.img_size >= 8, f"--img-size must be >= 8 pixels, got {self.img_size}"),
            (0.0 < self.crop_scale <= 1.0, f"--crop-scale must be in (0, 1], got {self.crop_scale}"),
            (self.shuffle_window >= 1, f"--shuffle-window must be >= 1 shard, got {self.shuffle_window}"),
            (self.global_batch is None or self.global_batch >= 1,
             f"--global-batch must be >= 1 (clips per step over all processes), got {self.global_batch}"),
            (self.test_every >= 0, f"--test-every must be >= 0 (0 = only at the end), got {self.test_every}"),
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.trunk_lr_scale >= 0.0, f"--trunk-lr-scale must be >= 0, got {self.trunk_lr_scale}"),
            (self.hidden_size >= 1, f"--hidden-size must be >= 1, got {self.hidden_size}"),
            (self.rnn_layers >= 1, f"--rnn-layers must be >= 1, got {self.rnn_layers}"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (clips per process), got {self.batch_size}"),
            (self.accum_steps >= 1, f"--accum-steps must be >= 1, got {self.accum_steps}"),
            (self.lr > 0.0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0.0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.warmup_epochs >= 0.0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0.0 < self.plateau_factor < 1.0, f"--plateau-factor must be in (0, 1), got {self.plateau_factor}"),
            (self.plateau_patience >= 0, f"--plateau-patience must be >= 0, got {self.plateau_patience}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip >= 0.0, f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.ckpt_every_steps >= 0, f"--ckpt-every-steps must be >= 0 (0 = off), got {self.ckpt_every_steps}"),
            (self.ckpt_every_minutes >= 0.0,
             f"--ckpt-every-minutes must be >= 0 (0 = off), got {self.ckpt_every_minutes}"),
            (self.keep_last >= 1,
             f"--keep-last must be >= 1 (the newest checkpoint is what a restart resumes from), got {self.keep_last}"),
            (self.wandb_init_timeout > 0.0, f"--wandb-init-timeout must be > 0 seconds, got {self.wandb_init_timeout}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.data_timeout >= 0.0, f"--data-timeout must be >= 0 seconds (0 = none), got {self.data_timeout}"),
            (self.stop_timeout > 0.0, f"--stop-timeout must be > 0 seconds, got {self.stop_timeout}"),
            (self.dist_timeout > 0.0, f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}"),
            (self.fetch_timeout > 0.0, f"--fetch-timeout must be > 0 seconds, got {self.fetch_timeout}"),
            (self.fetch_retries >= 0, f"--fetch-retries must be >= 0, got {self.fetch_retries}"),
            (self.seed >= -LIMITS["seed"][0], f"--seed must be at least {-LIMITS['seed'][0]:,}, got {self.seed:,}"),
            (self.model == "cnn_rnn" or self.pretrained != "imagenet",
             f"--pretrained imagenet is for cnn_rnn's ResNet18; {self.model} takes --pretrained kinetics or a path"),
            (self.model != "cnn_rnn" or self.pretrained != "kinetics",
             "--pretrained kinetics is for the 3D CNNs; cnn_rnn takes --pretrained imagenet or a path"),
            (not (self.freeze_trunk and self.trunk_lr_scale != 1.0),
             "--freeze-trunk and --trunk-lr-scale contradict each other: a frozen trunk has no learning rate"),
            (not self.freeze_trunk or self.pretrained is not None,
             "--freeze-trunk without --pretrained would train only the head on a randomly initialised trunk: "
             "pass --pretrained (imagenet for cnn_rnn, kinetics for the 3D CNNs, or a weights file) or drop "
             "--freeze-trunk"),
            (not self.overwrite or self.resume == "never",
             f"--overwrite only applies with --resume never: pass --resume never --overwrite to start over in a "
             f"run folder that holds checkpoints, or drop --overwrite (--no-overwrite) to use --resume "
             f"{self.resume}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict:
        """Plain dict of all fields (JSON-, YAML- and checkpoint-safe). It is what config.json, checkpoints and
        W&B keep, so ``shards`` is its public form: a URL without user, password or query string."""
        return {**asdict(self), "shards": public(self.shards)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_field(cfg: TrainConfig, f) -> None:
    """One field's type, choice, finiteness and upper bound (``LIMITS``); ValueError naming its flag."""
    value, flag = getattr(cfg, f.name), f"--{_flag(f.name)}"
    kind, optional = _parse_from(f)
    if value is None:
        if optional:
            return
        raise ValueError(f"{flag} must be given a value, got null/None")
    if kind is float and type(value) is int:
        value = float(value)
        setattr(cfg, f.name, value)
    if isinstance(kind, type) and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        raise ValueError(f"{flag} must be {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    limit = LIMITS.get(f.name)
    if limit and isinstance(value, (int, float)) and not isinstance(value, bool):
        most, why = limit
        if value > most:  # the lower bounds are in TrainConfig's checks
            raise ValueError(f"{flag} must be at most {most:,} ({why}), got {value:,}")


def _parse_from(f) -> tuple[Any, bool]:
    """``(base type or parse function, accepts None)`` of a field, read from its annotation."""
    if f.metadata.get("parse"):
        return f.metadata["parse"], False
    hint = _HINTS[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return next(a for a in args if a is not type(None)), type(None) in args


def _cli_type(f):
    """The argparse ``type=`` of a field's flag: its base type, with ``none`` for optional fields."""
    kind, optional = _parse_from(f)
    if not optional:
        return kind
    return lambda text: None if text.lower() in ("none", "null", "") else kind(text)


def _coerce(name: str, value: Any) -> Any:
    """A config file's (or flag's) value as the field's type; ValueError naming the field otherwise."""
    f = _FIELDS[name]
    kind, optional = _parse_from(f)
    if value is None and optional:
        return None
    if value is None and isinstance(kind, type):
        raise ValueError(f"config field {name} must be {kind.__name__}, got null (only optional fields take null)")
    if not isinstance(kind, type):
        return kind(value)
    if kind is float and type(value) is int:
        return float(value)
    if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        raise ValueError(f"config field {name} must be {kind.__name__}{' or null' if optional else ''}, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command line with one flag per config field; unset flags stay absent so the file can fill them."""
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m dist_train",
        description="Train a video classifier on WebDataset shards with DDP (also runs as plain "
                    "`python -m dist_train`). Flags override --config FILE, which overrides the defaults.",
        epilog="Exit status: 0 finished; 75 stopped by a signal after saving a checkpoint (resume with the same "
               "command; see OUT/status.json under torchrun); 2 bad configuration; 1 any other error.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file of config fields (default: none)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default})"
        if _parse_from(f)[0] is bool:
            p.add_argument(f"--{_flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(f"--{_flag(f.name)}", dest=f.name, type=_cli_type(f), choices=f.metadata.get("choices"),
                           help=help_text, metavar=None if f.metadata.get("choices") else f.name.upper())
    return p


def load_config_file(path: str | Path) -> dict:
    """Field values from a YAML, TOML or JSON file (``dist_train.config_files``)."""
    return read_config_file(path, set(_FIELDS))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the config file, then the flags; raises ValueError with what to change."""
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


_HINTS = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in fields(TrainConfig)}
