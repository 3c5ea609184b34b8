"""Classify raw video files with a trained model.

    python -m dist_train.predict --checkpoint runs/exp1/best.pt video.avi [more.avi ...] [--topk 5] [--json]

Each video goes through exactly the code that packed and evaluated the training data: the same
frame selection over the frames that decode, resizing and JPEG encoding (``preprocess.frames``, with
the packing arguments stored in the checkpoint), then the evaluation crop and normalisation
(``dist_train.evaluation``). A file that cannot be used (missing, unreadable, not a video, no frame
decodes, frames of different sizes) gets an error line naming it and the others are still classified.
(OpenCV's FFmpeg reader, seen with OpenCV 5.0, scales the frames after a mid-stream resolution change to the
stream's first size, so such a video is classified as the packer packed it; a reader that passes the
new size through gives frames of different sizes: an error line.)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dist_train import data
from dist_train.evaluation import UnusableCheckpoint, class_scores, eval_spec, load_trained_model
from dist_train.models import input_layout
from preprocess.frames import VideoError, read_clip_jpegs

EXIT_STATUS = ("exit status: 0 every video was classified; 1 some video could not be (an error line each, on "
               "stderr or as \"error\" with --json; the others are still classified); 2 the checkpoint cannot "
               "be used (nothing classified)")


class Predictor:
    """A checkpoint's model plus the preparation its training data went through."""

    def __init__(self, checkpoint: str, device: torch.device, views: int = 1):
        model, ckpt = load_trained_model(checkpoint)
        self.classes, cfg, packing = ckpt["classes"], ckpt["config"], ckpt.get("packing")
        if not packing:
            raise UnusableCheckpoint(f"{checkpoint} does not record how its shards were packed (made by an older "
                                     "version); retrain, or evaluate it on shards instead (python -m "
                                     "dist_train.evaluate)")
        try:
            self.layout, self.stats = input_layout(cfg["model"]), data.normalization(cfg["model"])
            k = packing.get("temporal_views", 1)  # frames per segment: the views averaged, as evaluation does
            self.spec = eval_spec(packing["frames"] * k, len(self.classes), cfg["img_size"], cfg["train_crop"],
                                  "error", views=views, temporal_views=k)
        except KeyError as e:
            raise UnusableCheckpoint(f"cannot use checkpoint {checkpoint}: its config or packing record lacks {e} "
                                     "(an older version); retrain, or evaluate it on shards instead") from None
        self.model, self.device, self.packing = model.to(device), device, packing

    def clip(self, jpegs: list[bytes]) -> torch.Tensor:
        """The evaluation clip of one video's packed JPEG frames; ``VideoError`` when they cannot form one."""
        try:
            return self.spec.make(jpegs, None)
        except ValueError as e:  # e.g. frames of different sizes: the resolution changed mid-stream
            raise VideoError(f"its frames cannot form one clip ({e}); re-encode it at one frame size, "
                             "e.g. ffmpeg -i IN -vf scale=W:H OUT") from None

    @torch.no_grad()
    def __call__(self, path: str, topk: int = 5) -> list[tuple[str, float]]:
        """The ``topk`` classes of one video with their probabilities; raises ``VideoError``."""
        p = self.packing
        _, jpegs = read_clip_jpegs(path, self.spec.n_frames, p["short_side"], p["quality"], p.get("min_frames") or 1)
        clip = self.clip(jpegs).to(self.device)
        probs = class_scores(self.model, clip[None], self.layout, self.stats).softmax(-1)[0]
        top = probs.topk(min(topk, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EXIT_STATUS)
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. runs/exp1/best.pt")
    p.add_argument("--topk", type=int, default=5, help="classes to show per video")
    p.add_argument("--views", type=int, default=1, choices=(1, 3), help="spatial crops averaged per video")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    try:
        predictor = Predictor(a.checkpoint, device, a.views)
    except UnusableCheckpoint as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path in a.videos:
        try:
            top, error = predictor(path, a.topk), None
        except VideoError as e:
            top, error = [], str(e)
            failed += 1
        if a.json:
            print(json.dumps({"path": path, "top": [{"class": c, "prob": round(v, 6)} for c, v in top],
                              "error": error}, ensure_ascii=False), flush=True)
        elif error:
            print(f"{path}: error: {error}", file=sys.stderr, flush=True)
        else:
            print(path)
            for c, v in top:
                print(f"  {v:6.3f}  {c}", flush=True)
    if failed:
        print(f"{failed} of {len(a.videos)} video(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
