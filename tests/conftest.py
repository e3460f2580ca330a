"""Fixtures shared by the test modules."""
import json
import os
import tempfile

import pytest

import data
import event_videos
import video

# the video pre-flight cache of this test session, not the user's (~/.cache/d2vlm)
os.environ[video.CACHE_ENV] = tempfile.mkdtemp(prefix="d2vlm-cache-")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """One synthetic set for the whole session: 6 train and 4 test videos with the default seed, so
    they are the first videos of the embedded default (a video depends only on the seed, its split
    and its index). Besides train.json and test.json it holds two smaller training files:
    tvg.json, the first tvg question of each video (6 records), and mixed.json, those plus each
    video's dvc record (12)."""
    root = tmp_path_factory.mktemp("synthetic")
    event_videos.make_synthetic(root, n_train=6, n_test=4, workers=2)
    seen = set()
    recs = [r for r in data.load_records(root / "train.json")
            if r["task"] != "tvg" or not (r["video"] in seen or seen.add(r["video"]))]
    (root / "tvg.json").write_text(json.dumps([r for r in recs if r["task"] == "tvg"]))
    (root / "mixed.json").write_text(json.dumps([r for r in recs if r["task"] in ("tvg", "dvc")]))
    return root
