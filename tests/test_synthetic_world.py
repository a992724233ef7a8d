"""synthesize(): split files valid and consistent; torch datasets over them."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.utils.data import DataLoader

import poserft.body as body
from poserft.body import BodyConfig
from poserft.configbase import ConfigError
from poserft.data.config import SynthConfig
from poserft.data.dataset import CaptionPoseDataset, ImagePoseDataset, VQADataset
from poserft.data.h5io import SplitReader, validate_split
from poserft.data.synthetic import synthesize

SMALL = {"num_train": 24, "num_val": 8, "num_test": 8, "image_size": 32,
         "captions_per_pose": 2, "vqa_per_pose": 2, "seed": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = {s: root / f"{s}.h5" for s in ("train", "val", "test")}
    stats = synthesize(SynthConfig.from_dict(SMALL, where="synth"), paths)
    return paths, stats


class RecordingTracker:
    def __init__(self):
        self.params, self.metrics = {}, {}

    def log_params(self, p):
        self.params.update(p)

    def log_metrics(self, m, step=None):
        self.metrics.update(m)


def test_files_validate_with_expected_sizes_and_attrs(world):
    paths, stats = world
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        assert validate_split(paths[split]) == {"N": n, "M": 2 * n, "Q": 2 * n}
        r = SplitReader(paths[split])
        assert r.image_shape == (32, 32, 3)
        attrs = r.attrs
        assert (attrs["source"], attrs["split"], attrs["body_model"]) == \
            ("synthetic", split, "skeleton")
        assert attrs["converter_params"]["synth"]["seed"] == 5
        assert stats[split]["num_poses"] == n and stats[split]["bytes"] > 0
    assert stats["total_seconds"] > 0


def test_stored_joints_are_body_model_joints_on_the_ground(world):
    r = SplitReader(world[0]["train"])
    p = r.poses()
    with torch.no_grad():
        j = body.load(None)(torch.from_numpy(p["global_orient"]), torch.from_numpy(p["body_pose"]),
                            transl=torch.from_numpy(p["transl"])).numpy()
    np.testing.assert_allclose(r.joints(), j, atol=1e-5)
    np.testing.assert_allclose(r.joints()[..., 1].min(axis=1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(p["betas"], 0)


def test_splits_are_disjoint_and_generation_is_deterministic(world, tmp_path):
    paths, _ = world
    poses = {s: SplitReader(paths[s]).poses()["body_pose"].reshape(-1, 69) for s in paths}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        d = np.abs(poses[a][:, None] - poses[b][None]).max(-1)
        assert d.min() > 1e-3, (a, b)
    # same config -> identical files' content; another seed -> different poses
    again = {s: tmp_path / f"{s}.h5" for s in paths}
    synthesize(SynthConfig.from_dict(SMALL, where="synth"), again)
    for s in paths:
        r1, r2 = SplitReader(paths[s]), SplitReader(again[s])
        np.testing.assert_array_equal(r1.images(), r2.images())
        assert list(r1.captions()) == list(r2.captions())
    # changing one split's size leaves the other splits unchanged
    other = {s: tmp_path / f"o_{s}.h5" for s in paths}
    synthesize(SynthConfig.from_dict({**SMALL, "num_train": 10}, where="synth"), other)
    np.testing.assert_array_equal(SplitReader(other["val"]).joints(),
                                  SplitReader(paths["val"]).joints())
    seed = {s: tmp_path / f"s_{s}.h5" for s in paths}
    synthesize(SynthConfig.from_dict({**SMALL, "seed": 6}, where="synth"), seed)
    moved = SplitReader(seed["val"]).joints() - SplitReader(paths["val"]).joints()
    assert np.abs(moved).max() > 0.1


def test_camera_fields_are_consistent(world):
    r = SplitReader(world[0]["val"])
    cam, j, uv = r.camera(), r.joints(), r.keypoints2d()
    j_cam = np.einsum("nij,nkj->nki", cam["R"], j) + cam["t"][:, None]
    proj = np.einsum("nij,nkj->nki", cam["K"], j_cam / j_cam[..., 2:])[..., :2]
    np.testing.assert_allclose(uv, proj, atol=1e-3)
    r_img = Rotation.from_rotvec(r.image_global_orient()).as_matrix()
    r_root = Rotation.from_rotvec(r.poses()["global_orient"]).as_matrix()
    np.testing.assert_allclose(r_img, cam["R"] @ r_root, atol=1e-5)


def test_caption_and_vqa_indices(world):
    r = SplitReader(world[0]["test"])
    np.testing.assert_array_equal(r.caption_pose_index(), np.repeat(np.arange(8), 2))
    texts = list(r.captions())
    assert all(isinstance(t, str) and len(t.split()) >= 4 for t in texts)
    vqa = r.vqa()
    assert all(a.startswith(("Yes, ", "No, ")) or not q.startswith(("Is ", "Are "))
               for q, a in zip(vqa["question"], vqa["answer"]))


def test_datasets_items_and_dataloader_workers(world):
    from poserft.body import POSE_DIM, vec6d_to_smpl
    path = world[0]["val"]
    r = SplitReader(path)
    caps = CaptionPoseDataset(path)
    assert len(caps) == 16
    item = caps[3]
    assert item["pose"].shape == (POSE_DIM,) and item["joints"].shape == (24, 3)
    go, bp = vec6d_to_smpl(item["pose"][None])
    expected = r.poses(item["pose_index"])
    assert Rotation.from_rotvec(go[0].numpy()).approx_equal(
        Rotation.from_rotvec(expected["global_orient"]), atol=1e-4)
    assert item["text"] == r.captions(3)

    images = ImagePoseDataset(path)
    it = images[2]
    assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
    assert 0 <= float(it["image"].min()) and float(it["image"].max()) <= 1
    np.testing.assert_allclose(it["image"].permute(1, 2, 0).numpy() * 255, r.images(2), atol=1e-3)
    cam, j = r.camera(2), r.joints(2)
    np.testing.assert_allclose(it["joints"].numpy(), (j - j[0]) @ cam["R"].T, atol=1e-5)
    go_cam, _ = vec6d_to_smpl(it["pose"][None])
    assert Rotation.from_rotvec(go_cam[0].numpy()).approx_equal(
        Rotation.from_rotvec(r.image_global_orient(2)), atol=1e-4)

    vqa = VQADataset(path, with_images=True)
    assert len(vqa) == 16 and vqa[0]["image"].shape == (3, 32, 32)

    loader = DataLoader(caps, batch_size=5, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert sum(len(b["text"]) for b in batches) == 16
    assert batches[0]["pose"].shape == (5, POSE_DIM)


def test_datasets_explain_missing_data(tmp_path):
    from poserft.data.h5io import write_split
    n = 3
    path = write_split(tmp_path / "bare.h5", {
        "poses/global_orient": np.zeros((n, 3)), "poses/body_pose": np.zeros((n, 23, 3)),
        "poses/betas": np.zeros((n, 10)), "joints": np.zeros((n, 24, 3))},
        {"source": "t", "split": "val", "body_model": "skeleton", "converter_params": {}})
    with pytest.raises(KeyError, match="bare.h5.*CaptionPoseDataset.*captions/text"):
        len(CaptionPoseDataset(path))
    with pytest.raises(KeyError, match="ImagePoseDataset.*images"):
        len(ImagePoseDataset(path))
    with pytest.raises(KeyError, match="VQADataset"):
        len(VQADataset(path))


def test_config_errors_and_tracker(tmp_path):
    paths = {s: tmp_path / f"{s}.h5" for s in ("train", "val", "test")}
    with pytest.raises(ConfigError, match="synth.archetypes.*flying"):
        synthesize(SynthConfig.from_dict({"archetypes": ["flying"]}, where="synth"), paths)
    with pytest.raises(ConfigError, match="synth.min_codes_per_caption"):
        synthesize(SynthConfig.from_dict({"min_codes_per_caption": 9, "max_codes_per_caption": 3},
                                         where="synth"), paths)
    with pytest.raises(ConfigError, match="synth.num_train"):
        SynthConfig.from_dict({"num_train": 0}, where="synth")
    with pytest.raises(ValueError, match="exactly the keys"):
        synthesize(SynthConfig.from_dict(SMALL, where="synth"), {"train": paths["train"]})
    with pytest.raises(ConfigError, match="body.model_path"):
        synthesize(SynthConfig.from_dict(SMALL, where="synth"), paths,
                   body=BodyConfig.from_dict({"model": "smpl"}, where="body"))
    assert not any(p.exists() for p in paths.values())
    tracker = RecordingTracker()
    stats = synthesize(SynthConfig.from_dict({**SMALL, "render_images": False, "vqa_per_pose": 0,
                                              "archetypes": ["standing", "sitting"]}, where="synth"),
                       paths, tracker)
    assert tracker.params["synth.num_train"] == 24
    assert tracker.metrics["train.num_captions"] == 48 == stats["train"]["num_captions"]
    r = SplitReader(paths["train"])
    assert not r.has("images") and r.num_vqa == 0
    assert set(r.read("meta/posture")) <= {"standing", "sitting"}
