"""Renderer: camera geometry, projection, coverage of keypoints, left/right colours,
occlusion order, camera-frame root orientation."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

import poserft.body as body
from poserft.data.synthetic.renderer import (Cameras, camera_global_orient, project, render,
                                             sample_cameras)
from poserft.data.synthetic.sampler import JOINT_INDEX as J
from poserft.data.synthetic.sampler import sample_poses

MODEL = body.load(None)


def joints_of(global_orient, body_pose):
    with torch.no_grad():
        return MODEL(torch.as_tensor(global_orient, dtype=torch.float32),
                     torch.as_tensor(body_pose, dtype=torch.float32)).numpy().astype(np.float64)


def random_world(n=24, seed=0):
    s = sample_poses(n, np.random.default_rng(seed))
    return s, joints_of(s.global_orient, s.body_pose)


def facing_camera(center, f=70.0, size=64):
    """Look-at camera at ``center`` looking along -z (at a person facing +z)."""
    forward, up = np.array([0, 0, -1.0]), np.array([0, 1.0, 0])
    right = np.cross(forward, up)
    R = np.stack([right, np.cross(forward, right), forward])[None]
    K = np.array([[[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]]])
    return Cameras(K=K, R=R, t=-(R[0] @ np.asarray(center, float))[None])


def test_cameras_are_proper_rotations_framing_the_body():
    _, j = random_world()
    cams = sample_cameras(j, np.random.default_rng(1), 64)
    np.testing.assert_allclose(cams.R @ cams.R.transpose(0, 2, 1), np.tile(np.eye(3), (24, 1, 1)),
                               atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(cams.R), 1.0, atol=1e-10)
    uv, depth = project(j, cams)
    assert (depth > 0.3).all()
    assert uv.min() >= 0 and uv.max() <= 64                  # every joint inside the image
    # the body's bounding-box centre projects near the principal point
    centre = (j.min(1) + j.max(1)) / 2
    uvc, _ = project(centre[:, None], cams)
    assert np.abs(uvc[:, 0] - 32).max() < 6
    # world up projects upward in the image (OpenCV y down): head above pelvis for upright
    up = np.einsum("nij,j->ni", cams.R, [0.0, 1.0, 0.0])
    assert (up[:, 1] < 0).all()


def test_projection_matches_explicit_pinhole_formula():
    _, j = random_world(5, seed=3)
    cams = sample_cameras(j, np.random.default_rng(2), 48)
    uv, depth = project(j, cams)
    for n in range(5):
        for k in (0, 7, 20):
            x, y, z = cams.R[n] @ j[n, k] + cams.t[n]
            f, c = cams.K[n, 0, 0], cams.K[n, 0, 2]
            np.testing.assert_allclose(uv[n, k], [f * x / z + c, f * y / z + c], rtol=1e-10)
            assert np.isclose(depth[n, k], z)


def test_images_dtype_shape_and_keypoints_on_body_pixels():
    _, j = random_world(16, seed=4)
    rng = np.random.default_rng(5)
    cams = sample_cameras(j, rng, 40)
    images, masks = render(j, cams, 40, rng, background_noise=0.03)
    assert images.dtype == np.uint8 and images.shape == (16, 40, 40, 3)
    assert masks.shape == (16, 40, 40)
    assert 0.03 < masks.mean() < 0.6
    uv, _ = project(j, cams)
    px = np.clip(np.floor(uv).astype(int), 0, 39)
    for n in range(16):
        assert masks[n, px[n, :, 1], px[n, :, 0]].all()      # every joint lands on the body
    # body pixels differ from the background around them
    body_px = images[masks].astype(float)
    bg_px = images[~masks].astype(float)
    assert abs(body_px.mean() - bg_px.mean()) > 20 or \
        np.abs(body_px.std(0) - bg_px.std(0)).max() > 10


def test_left_and_right_limbs_have_distinct_colours():
    """T-pose seen from the front: the left wrist pixel is red/orange, the right one blue."""
    j = joints_of(np.zeros((1, 3)), np.zeros((1, 23, 3)))
    cams = facing_camera([0.0, 0.0, 3.0], f=60.0)
    images, _ = render(j, cams, 64, np.random.default_rng(0), background_noise=0.0)
    uv, _ = project(j, cams)
    lw = np.floor(uv[0, J["left_wrist"]]).astype(int)
    rw = np.floor(uv[0, J["right_wrist"]]).astype(int)
    assert lw[0] > 32 > rw[0]                 # the person's left is on the image's right
    left_rgb = images[0, lw[1], lw[0]].astype(int)
    right_rgb = images[0, rw[1], rw[0]].astype(int)
    assert left_rgb[0] > left_rgb[2] + 60     # red/orange dominates
    assert right_rgb[2] > right_rgb[0] + 60   # blue/cyan dominates


def test_nearer_limb_occludes_farther_one():
    """A forearm held horizontally in front of the face hides the head at its keypoint."""
    def head_pixel(bp):
        j = joints_of(np.zeros((1, 3)), bp)
        cams = facing_camera([0.0, 0.3, 3.0])
        images, _ = render(j, cams, 64, np.random.default_rng(0), background_noise=0.0)
        uv, depth = project(j, cams)
        u, v = np.floor(uv[0, J["head"]]).astype(int)
        return images[0, v, u].astype(int), j, depth

    bp = np.zeros((1, 23, 3))
    # upper arm forward and 25 deg up, elbow bent 90 deg so the forearm crosses the face
    shoulder = Rotation.from_euler("x", -25, degrees=True) * \
        Rotation.from_euler("y", -90, degrees=True)
    bp[0, J["left_shoulder"] - 1] = shoulder.as_rotvec()
    bp[0, J["left_elbow"] - 1] = np.radians([0, -90, 0])
    covered, j, depth = head_pixel(bp)
    assert abs(j[0, J["left_wrist"], 0]) < abs(j[0, J["left_elbow"], 0])    # forearm medial
    assert depth[0, J["left_elbow"]] < depth[0, J["head"]] - 0.1           # and in front
    bare, _, _ = head_pixel(np.zeros((1, 23, 3)))
    # skin (0.92, 0.78, 0.62) has much more blue than the orange forearm (1.0, 0.6, 0.15)
    assert bare[2] > covered[2] + 40 and covered[0] > covered[2] + 80


def test_camera_global_orient_is_camera_rotation_times_root():
    s, j = random_world(6, seed=7)
    cams = sample_cameras(j, np.random.default_rng(0), 64)
    go_cam = camera_global_orient(s.global_orient, cams)
    expected = cams.R @ Rotation.from_rotvec(s.global_orient).as_matrix()
    np.testing.assert_allclose(Rotation.from_rotvec(go_cam).as_matrix(), expected, atol=1e-6)
    # joints of the camera-frame pose equal the camera-frame joints up to translation
    j_cam = np.einsum("nij,nkj->nki", cams.R, j) + cams.t[:, None]
    j_from_cam_pose = joints_of(go_cam, s.body_pose)
    np.testing.assert_allclose(j_from_cam_pose - j_from_cam_pose[:, :1], j_cam - j_cam[:, :1],
                               atol=2e-5)
