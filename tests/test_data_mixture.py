"""Training data as config (issue #15): the ``data`` mixtures of retrieval/sft/rft, the
multi-source task data, its DataLoader batches, and the MLflow record of what was read."""

import copy

import numpy as np
import pytest
import torch
import yaml

from poserft.config import ConfigError, load_config
from poserft.model.testing import make_test_split, tiny_model_config
from poserft.train.data import SFTTaskData, StepBatches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = yaml.safe_load(open(__import__("pathlib").Path(__file__).parents[1] / "config.yaml"))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    a = make_test_split(d / "a" / "train.h5", 24, seed=0)
    b = make_test_split(d / "b" / "train.h5", 40, seed=3)
    # a text-only source: captions and poses, no images or VQA
    import h5py
    text_only = d / "t" / "train.h5"
    text_only.parent.mkdir()
    import shutil
    shutil.copy(a, text_only)
    with h5py.File(text_only, "a") as f:
        for key in ("images", "vqa", "keypoints2d", "image_pose"):
            del f[key]
    return {"a": a, "b": b, "t": text_only}


# ----------------------------------------------------------------------------- config

def _cfg(**sections):
    cfg = copy.deepcopy(BASE)
    for name, value in sections.items():
        cfg[name] = {**(cfg.get(name) or {}), **value}
    return cfg


def test_default_mixture_is_the_synthetic_world():
    cfg = load_config(_cfg())
    assert cfg["sft"].data == cfg["rft"].data == cfg["retrieval"].data == {"synthetic": 1.0}
    assert cfg.training_files("sft", "dist") == {"synthetic__train": "data/synthetic/train.h5",
                                                 "synthetic__val": "data/synthetic/val.h5"}
    assert set(cfg.training_files("retrieval", splits=("train", "val", "test"))) == {
        "synthetic__train", "synthetic__val", "synthetic__test"}


@pytest.mark.parametrize("section, data, match", [
    ("sft", {"posescript": 1.0}, r"sft\.data\.posescript: not a data source.*datasets\.enabled"),
    ("rft", {"synthetic": 0.0}, r"rft\.data\.synthetic: weight 0\.0 must be a number > 0"),
    ("retrieval", {}, r"retrieval\.data: no source"),
])
def test_bad_mixtures_name_the_key(section, data, match):
    cfg = _cfg()
    cfg[section] = {**(cfg.get(section) or {}), "data": data}
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_a_variant_mixture_is_checked_and_used():
    cfg = _cfg()
    cfg["variants"]["dist"]["sft"] = {**cfg["variants"]["dist"].get("sft", {}),
                                      "data": {"pw3d": 1.0}}
    with pytest.raises(ConfigError, match=r"variants\.dist\.sft\.data\.pw3d: not a data source"):
        load_config(cfg)
    cfg["datasets"] = {"enabled": ["pw3d"]}
    loaded = load_config(cfg)
    assert loaded.training_files("sft", "dist") == {
        "pw3d__train": "data/pw3d/train.h5", "pw3d__val": "data/pw3d/val.h5"}
    assert "synthetic__train" in loaded.training_files("sft", "baseline")


def test_a_source_without_train_split_is_refused():
    cfg = _cfg(datasets={"enabled": ["h36m"], "h36m": {"splits": {"test": ["S9", "S11"]}}},
               sft={"data": {"h36m": 1.0}})
    with pytest.raises(ConfigError, match=r"sft\.data\.h36m: the dataset has no 'train' split"):
        load_config(cfg)


# ----------------------------------------------------------------------------- task data

def test_sources_are_drawn_by_weight_within_each_task(splits):
    cfg = tiny_model_config()
    data = SFTTaskData({"a": (splits["a"], 3.0), "b": (splits["b"], 1.0), "t": (splits["t"], 4.0)},
                       cfg, {"text2pose": 1.0, "image2pose": 1.0}, seed=2)
    assert data.task_sizes == {"text2pose": 24 + 40 + 24, "image2pose": 24 + 40, "image2text": 24 + 40}
    counts = {("text2pose", k): 0 for k in range(3)} | {("image2pose", k): 0 for k in range(3)}
    for step in range(300):
        for e in data.sample(step, 0, 16):
            counts[(e.task, e.source)] += 1
    text = np.array([counts[("text2pose", k)] for k in range(3)], float)
    image = np.array([counts[("image2pose", k)] for k in range(3)], float)
    # text2pose: all three provide it (3:1:4); image2pose: only a and b (3:1), t has no images
    np.testing.assert_allclose(text / text.sum(), [3 / 8, 1 / 8, 4 / 8], atol=0.03)
    np.testing.assert_allclose(image / image.sum(), [0.75, 0.25, 0.0], atol=0.03)
    # each example is the row of its own source: prompt caption and target pose agree
    batch = data.batch(5, 1, 32)
    for n, e in enumerate(data.sample(5, 1, 32)):
        src = data.sources[e.source]
        want = src.targets(e.task, np.array([e.pose_index]))[0]
        torch.testing.assert_close(batch["poses"][n], want)
        if e.task == "text2pose":
            assert e.caption in e.prompt and e.caption in src.captions


def test_one_source_mixture_draws_what_the_single_split_sampler_drew(splits):
    cfg = tiny_model_config()
    one = SFTTaskData(splits["b"], cfg, {"text2pose": 1.0, "image2pose": 2.0}, seed=7)
    named = SFTTaskData({"b": (splits["b"], 5.0)}, cfg, {"text2pose": 1.0, "image2pose": 2.0}, seed=7)
    assert one.sample(3, 2, 16) == named.sample(3, 2, 16)
    # the stream the pre-mixture sampler used: task by weight, then rng.integers(task size)
    rng = np.random.default_rng([7, 3, 2])
    tasks = rng.choice(2, size=16, p=one.probs)
    want = [(one.tasks[k], int(rng.integers(one.task_sizes[one.tasks[k]]))) for k in tasks]
    assert [(e.task, e.pose_index if e.task == "image2pose" else None) for e in one.sample(3, 2, 16)] \
        == [(t, i if t == "image2pose" else None) for t, i in want]


def test_large_splits_are_read_row_by_row_with_the_same_targets(splits, monkeypatch):
    from poserft.train import data as D
    cfg = tiny_model_config()
    sources = {"a": (splits["a"], 1.0), "b": (splits["b"], 2.0)}
    weights = {"text2pose": 1.0, "image2pose": 1.0}
    memory = SFTTaskData(sources, cfg, weights, seed=1, text2pose_remove_yaw=True)
    monkeypatch.setattr(D, "INMEMORY_POSE_ROWS", 0)
    lazy = SFTTaskData(sources, cfg, weights, seed=1, text2pose_remove_yaw=True)
    assert all(s.poses is None for s in lazy.sources)
    for step in range(3):
        torch.testing.assert_close(lazy.batch(step, 0, 16)["poses"], memory.batch(step, 0, 16)["poses"],
                                   rtol=0, atol=1e-6)
    for task in ("text2pose", "image2pose", None):
        torch.testing.assert_close(lazy.mean_pose6d(task), memory.mean_pose6d(task), rtol=0, atol=1e-6)
    # the pooled mean is the mean over the concatenated targets (checked in float64 with numpy)
    pooled = np.concatenate([memory.task_targets(t).numpy().astype(np.float64)
                             for t in ("text2pose", "image2pose")])
    np.testing.assert_allclose(memory.mean_pose6d().numpy(), pooled.mean(0), atol=1e-6)


def test_step_batches_in_workers_equal_the_in_process_batches(splits):
    cfg = tiny_model_config()
    data = SFTTaskData({"a": (splits["a"], 1.0), "b": (splits["b"], 1.0)}, cfg,
                       {"text2pose": 1.0, "image2pose": 1.0, "image2text": 1.0}, seed=4)
    inline = list(StepBatches(data, start=2, steps=5, grad_accum=2, batch_size=8, rank=1, world=2))
    workers = list(StepBatches(data, start=2, steps=5, grad_accum=2, batch_size=8, rank=1, world=2,
                               num_workers=2))
    assert len(inline) == len(workers) == 3 and all(len(s) == 2 for s in inline)
    for got, want in zip(workers, inline):
        for g, w in zip(got, want):
            assert g["prompts"] == w["prompts"] and g["tasks"] == w["tasks"]
            torch.testing.assert_close(g["poses"], w["poses"])
            torch.testing.assert_close(g["images"], w["images"])
    # step 2's micro-batches are those of (step 2, micro m * world + rank)
    assert inline[0][1]["prompts"] == data.batch(2, 1 * 2 + 1, 8)["prompts"]


# ----------------------------------------------------------------------------- MLflow

def test_datasets_read_are_recorded_as_mlflow_run_inputs(splits, tmp_path):
    from mlflow import MlflowClient

    from poserft.tracking import Tracker
    data = SFTTaskData({"a": (splits["a"], 3.0), "t": (splits["t"], 1.0)}, tiny_model_config(),
                       {"text2pose": 1.0, "image2pose": 1.0}, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker("mix", "sft", tracking_uri=uri, results_dir=tmp_path) as tracker:
        tracker.log_datasets(data.dataset_records("train"))
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"a/train", "t/train"}
    tags = {t.key: t.value for t in inputs["a/train"].tags}
    assert tags == {"mlflow.data.context": "train", "weight": "3"}
    assert str(splits["a"].resolve()) in inputs["a/train"].dataset.source
    assert '"image2pose": 0' in inputs["t/train"].dataset.profile


# ----------------------------------------------------------------------------- images by path

def _path_world(root):
    """A pose split with /image_paths (full frames + SPIN boxes; row 2's file is missing)
    and a VQA-only split (LLaVA-Instruct layout: N = 0 poses, one image per question)."""
    from PIL import Image

    from poserft.data.h5io import write_split
    attrs = {"source": "unit", "split": "train", "body_model": "skeleton", "converter_params": {}}
    (root / "img").mkdir(parents=True)
    n = 6
    for i in range(n):
        if i != 2:
            frame = np.full((48, 64, 3), 30 * i, np.uint8)
            frame[8:40, 20:44] = (230, 20, 20)
            Image.fromarray(frame).save(root / "img" / f"{i}.jpg")
    rng = np.random.default_rng(0)
    poses = write_split(root / "poses" / "train.h5", {
        "poses/global_orient": np.zeros((n, 3), np.float32),
        "poses/body_pose": (rng.normal(size=(n, 23, 3)) * 0.2).astype(np.float32),
        "poses/betas": np.zeros((n, 10), np.float32), "joints": np.zeros((n, 24, 3), np.float32),
        "image_paths": [str(root / "img" / f"{i}.jpg") for i in range(n)],
        "meta/bbox_center": np.tile([32.0, 24.0], (n, 1)), "meta/bbox_scale": np.full(n, 0.2)},
        attrs)
    vqa = write_split(root / "llava" / "train.h5", {
        "poses/global_orient": np.zeros((0, 3), np.float32),
        "poses/body_pose": np.zeros((0, 23, 3), np.float32),
        "poses/betas": np.zeros((0, 10), np.float32), "joints": np.zeros((0, 24, 3), np.float32),
        "vqa/question": ["<image>\nWhat is red?", "How many?"], "vqa/answer": ["a box", "one"],
        "vqa/image_paths": [str(root / "img" / "0.jpg"), str(root / "img" / "1.jpg")],
        "vqa/conversation_index": np.array([0, 0])}, attrs)
    return poses, vqa


def test_image_paths_are_cropped_resized_and_bad_files_fail_or_are_skipped(tmp_path):
    from poserft.data.config import LoaderConfig
    from poserft.data.images import ImageLoadError
    poses, vqa = _path_world(tmp_path)
    cfg = tiny_model_config()
    sources = {"poses": (poses, 1.0), "llava": (vqa, 1.0)}
    weights = {"image2pose": 1.0, "image2text": 1.0}
    fail = SFTTaskData(sources, cfg, weights, seed=0,
                       loader=LoaderConfig(image_size=32), stage="sft.loader")
    assert fail.task_sizes["image2pose"] == 6 and fail.task_sizes["image2text"] == 2
    with pytest.raises(ImageLoadError, match=r"train\.h5.*row 2.*2\.jpg.*sft\.loader\.on_bad_image"):
        for step in range(50):
            fail.batch(step, 0, 8)
    skip = SFTTaskData(sources, cfg, weights, seed=0,
                       loader=LoaderConfig(image_size=32, on_bad_image="skip"), stage="sft.loader")
    redrawn = 0
    for step in range(50):
        before = skip.skipped_images
        b = skip.batch(step, 0, 8)
        assert skip.skipped_images - before == b["skipped_images"]
        redrawn += b["skipped_images"]
        assert b["images"].shape == (8, 32, 32, 3)
        examples = skip.with_images(skip.sample(step, 0, 8), (step, 0))[0]
        assert not any(e.task == "image2pose" and e.pose_index == 2 for e in examples)
        for n, e in enumerate(examples):
            if e.task == "image2text":       # a VQA-only row: the question's own whole image
                assert e.source == 1 and not b["has_pose"][n] and b["poses"][n].abs().sum() == 0
            else:                             # a person crop: the red box fills the middle
                assert b["images"][n, 16, 16, 0] > 180
    assert redrawn > 0
