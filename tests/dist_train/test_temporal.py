"""Temporal views of shards packed with ``--temporal-views K``: which frames a clip takes (jitter in training,
the middle frame without it, every view at evaluation) and what averaging the views does to a prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train import data
from dist_train.data.loaders import TrainStream
from dist_train.evaluation import averaged, eval_spec, evaluate_samples, view_logits
from dist_train.models import build_model
from preprocess.shard_format import load_manifest
from tests.conftest import make_shards


def spec(k: int, temporal: str, t: int = 4) -> data.SampleSpec:
    return data.SampleSpec(t * k, 2, data.ClipTransform(16, False), "error", temporal_views=k, temporal=temporal)


def test_a_clip_takes_one_frame_per_segment_by_the_rule():
    stored = list(range(12))  # 4 segments x 3 frames
    assert spec(3, "centre").pick(stored, 5) == [[1, 4, 7, 10]]
    assert spec(3, "all").pick(stored, None) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    picks = [spec(3, "jitter").pick(stored, seed)[0] for seed in range(20)]
    assert all(p[i] // 3 == i for p in picks for i in range(4))  # one frame of each segment, in order
    assert picks[3] == spec(3, "jitter").pick(stored, 3)[0] and len({tuple(p) for p in picks}) > 10
    assert spec(1, "jitter", t=12).pick(stored, 7) == [stored]  # one view: nothing to choose


@pytest.fixture(scope="module")
def three_views(sample_videos, tmp_path_factory):
    """``sample_videos`` packed with one and with three frames per segment."""
    one = make_shards(sample_videos, tmp_path_factory.mktemp("k1"), shard_size=4, frames=4)
    three = make_shards(sample_videos, tmp_path_factory.mktemp("k3"), shard_size=4, frames=4, temporal_views=3)
    return load_manifest(one), load_manifest(three)


def clips_by_key(plan: data.DataPlan, sample_spec: data.SampleSpec, epoch: int) -> dict[str, torch.Tensor]:
    out = {}
    for batch in TrainStream(plan, sample_spec, 0, epoch):
        out.update(zip(batch.keys, batch.video.clone()))
    return out


@pytest.mark.parametrize("jitter", [True, False])
def test_jitter_gives_a_sample_other_frames_each_epoch_and_none_without_it(three_views, jitter):
    m = three_views[1]
    plan = data.make_plan(m, data.resolve_layout(1, 2), workers=0, seed=3)
    # A centre crop: only the choice of frames can differ between epochs.
    s = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(16, False), "error",
                        temporal_views=3, temporal="jitter" if jitter else "centre")
    first, second = clips_by_key(plan, s, 0), clips_by_key(plan, s, 1)
    both = sorted(first.keys() & second.keys())
    differ = [k for k in both if not torch.equal(first[k], second[k])]
    assert len(both) >= 8
    assert (len(differ) >= len(both) // 2) if jitter else differ == []


def test_averaging_the_views_can_change_the_prediction():
    class Brightness(torch.nn.Module):  # class 0 for bright clips, 1 for dark ones: logits 8 (m - 0.5)
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3, 4))
            return torch.stack([8 * (m - 0.5), -8 * (m - 0.5)], 1)

    video = torch.zeros(1, 3, 2, 3, 4, 4, dtype=torch.uint8)
    video[0, 0] = 255  # one very bright view
    video[0, 1:] = 120  # two a little dark
    logits = view_logits(Brightness(), video, "BTCHW", ((0.0,) * 3, (1.0,) * 3))
    assert logits.argmax(-1).tolist() == [[0, 1, 1]]  # two of three views say 1 ...
    assert averaged(logits).argmax(-1).tolist() == [0]  # ... the averaged probabilities say 0


def test_one_temporal_view_of_three_is_the_one_view_pack(three_views):
    one, three = three_views
    torch.manual_seed(0)
    model = build_model("cnn_rnn", one.num_classes, hidden=8).eval()
    kw = dict(classes=one.classes, layout="BTCHW", stats=data.normalization("cnn_rnn"), device=torch.device("cpu"))

    def run(m, **views):
        samples = data.Samples.of(m, "test")
        s = eval_spec(m.n_frames, m.num_classes, 16, "random", "error", temporal_views=m.temporal_views, **views)
        return evaluate_samples(model, samples, np.arange(len(samples)), s, **kw)

    single, middle, all3 = run(one), run(three, all_temporal=False), run(three)
    assert middle["loss"] == single["loss"] and middle["confusion"] == single["confusion"]
    assert single["views_note"] == middle["views_note"] == "1 temporal x 1 spatial views"
    assert all3["views_note"] == "3 temporal x 1 spatial views" and all3["loss"] != single["loss"]
    assert all3["n_samples"] == single["n_samples"] == one.count("test")


def test_predict_reads_every_temporal_view_of_a_raw_video(learned, tmp_path):
    from dist_train.predict import Predictor
    from preprocess.frames import read_clip_jpegs

    ckpt = torch.load(learned["out"] / "best.pt", weights_only=True)
    ckpt["packing"]["temporal_views"] = 3  # as if trained on shards of three frames per segment
    torch.save(ckpt, tmp_path / "k3.pt")
    one, three = Predictor(learned["out"] / "best.pt", torch.device("cpu")), Predictor(tmp_path / "k3.pt",
                                                                                      torch.device("cpu"))
    video = str(next(learned["videos"].rglob("*.avi")))
    p = one.packing
    frames = p["frames"]
    _, jpegs3 = read_clip_jpegs(video, 3 * frames, p["short_side"], p["quality"])
    _, jpegs1 = read_clip_jpegs(video, frames, p["short_side"], p["quality"])
    clip3 = three.clip(jpegs3)
    assert three.spec.n_frames == 3 * frames and clip3.shape[0] == 3  # three views of `frames` frames
    assert torch.equal(clip3[1], one.clip(jpegs1))  # the middle view is the one-view clip
    assert sum(prob for _, prob in three(video)) == pytest.approx(1.0, abs=1e-4)


def test_a_resume_at_another_world_size_gives_every_clip_the_same_frames(three_views):
    m = three_views[1]
    s = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(16, True), "error", temporal_views=3,
                        temporal="jitter")  # random crops and flips too
    whole = clips_by_key(data.make_plan(m, data.resolve_layout(1, 2, 1, 4), workers=0, seed=3), s, 1)
    plan2 = data.make_plan(m, data.resolve_layout(2, 2, 1, 4), workers=0, seed=3)
    resumed = {}
    for rank in (0, 1):
        for batch in TrainStream(plan2, s, rank, 1, start_step=1):
            resumed.update(zip(batch.keys, batch.video.clone()))
    assert len(resumed) >= 4 and set(resumed) < set(whole)
    assert all(torch.equal(resumed[k], whole[k]) for k in resumed)
