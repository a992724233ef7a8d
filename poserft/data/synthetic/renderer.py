"""Skeleton renderer: random perspective cameras and shaded-capsule RGB images.

Camera convention (OpenCV): ``x_cam = R @ x_world + t`` with camera axes x right, y down,
z forward; pixel ``u = fx * x/z + cx``, ``v = fy * y/z + cy`` (continuous coordinates,
pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``). ``K = [[f,0,c],[0,f,c],[0,0,1]]``
with ``c = size/2``.

Cameras look at the body's bounding-box centre from a random azimuth (all around) and
elevation; the distance is chosen so that the body's bounding sphere covers a random
fraction ``fill`` of the image height, and the focal length is jittered.

Each bone is a capsule (a segment with a radius in metres). Per pixel and bone we compute
the distance to the projected segment; the capsule covers the pixel when that distance is
below the projected radius (at least ``MIN_RADIUS_PX``, so thin far limbs stay visible),
and its surface depth there is the segment depth minus the capsule's bulge. A z-buffer
(argmin over bones) resolves occlusion. Shading combines the bulge (cosine to the view
direction) and a depth cue. Left and right limbs (and upper
and lower segments) have distinct colours so the image determines the pose's chirality.
Everything is vectorised over a batch of images x bones x pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from poserft.data.synthetic.sampler import JOINT_INDEX as J

__all__ = ["BONES", "MIN_RADIUS_PX", "Cameras", "sample_cameras", "project", "render",
           "camera_global_orient"]

_TORSO = (0.55, 0.58, 0.50)
_SKIN = (0.92, 0.78, 0.62)
# (parent, child, radius m, RGB). A zero-length bone (head, head) is a sphere.
BONES: tuple[tuple[str, str, float, tuple[float, float, float]], ...] = (
    ("pelvis", "spine1", 0.11, _TORSO), ("spine1", "spine2", 0.11, _TORSO),
    ("spine2", "spine3", 0.11, _TORSO), ("spine3", "neck", 0.08, _TORSO),
    ("pelvis", "left_hip", 0.08, _TORSO), ("pelvis", "right_hip", 0.08, _TORSO),
    ("spine3", "left_collar", 0.07, _TORSO), ("spine3", "right_collar", 0.07, _TORSO),
    ("left_collar", "left_shoulder", 0.06, _TORSO),
    ("right_collar", "right_shoulder", 0.06, _TORSO),
    ("neck", "head", 0.055, _SKIN), ("head", "head", 0.11, _SKIN),
    ("left_shoulder", "left_elbow", 0.05, (0.95, 0.25, 0.20)),
    ("left_elbow", "left_wrist", 0.04, (1.00, 0.60, 0.15)),
    ("left_wrist", "left_hand", 0.035, (1.00, 0.88, 0.30)),
    ("right_shoulder", "right_elbow", 0.05, (0.20, 0.30, 0.95)),
    ("right_elbow", "right_wrist", 0.04, (0.15, 0.75, 0.95)),
    ("right_wrist", "right_hand", 0.035, (0.55, 0.95, 0.95)),
    ("left_hip", "left_knee", 0.075, (0.80, 0.10, 0.45)),
    ("left_knee", "left_ankle", 0.055, (0.95, 0.45, 0.65)),
    ("left_ankle", "left_foot", 0.04, (0.90, 0.70, 0.80)),
    ("right_hip", "right_knee", 0.075, (0.10, 0.55, 0.25)),
    ("right_knee", "right_ankle", 0.055, (0.35, 0.85, 0.35)),
    ("right_ankle", "right_foot", 0.04, (0.65, 0.95, 0.55)),
)
_BONE_A = np.array([J[b[0]] for b in BONES])
_BONE_B = np.array([J[b[1]] for b in BONES])
_BONE_R = np.array([b[2] for b in BONES], dtype=np.float32)
_BONE_RGB = np.array([b[3] for b in BONES], dtype=np.float32)
MIN_RADIUS_PX = 0.75  # smallest drawn capsule radius, pixels
_BODY_MARGIN = 0.12   # metres added to the joints' bounding sphere for limb thickness


@dataclass
class Cameras:
    """K (N,3,3), R (N,3,3), t (N,3): world -> camera, OpenCV axes."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray


def sample_cameras(joints: np.ndarray, rng: np.random.Generator, size: int, *,
                   focal_scale: float = 1.4, focal_jitter: float = 0.05,
                   elevation_deg: tuple[float, float] = (-10.0, 35.0),
                   fill: tuple[float, float] = (0.75, 0.95)) -> Cameras:
    """Random look-at cameras framing each pose (joints (N,24,3) world, y up)."""
    n = len(joints)
    lo, hi = joints.min(axis=1), joints.max(axis=1)
    target = (lo + hi) / 2 + rng.normal(0, 0.03, (n, 3))
    radius = np.linalg.norm(joints - target[:, None], axis=-1).max(axis=1) + _BODY_MARGIN
    f = size * focal_scale * (1 + rng.uniform(-focal_jitter, focal_jitter, n))
    frac = rng.uniform(fill[0], fill[1], n)
    dist = np.maximum(2 * radius * f / (frac * size), radius + 0.3)
    az = rng.uniform(0, 2 * np.pi, n)
    el = np.radians(rng.uniform(elevation_deg[0], elevation_deg[1], n))
    center = target + dist[:, None] * np.stack(
        [np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], axis=1)
    forward = target - center
    forward /= np.linalg.norm(forward, axis=1, keepdims=True)
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward], axis=1)
    t = -np.einsum("nij,nj->ni", R, center)
    K = np.zeros((n, 3, 3))
    K[:, 0, 0] = K[:, 1, 1] = f
    K[:, 0, 2] = K[:, 1, 2] = size / 2
    K[:, 2, 2] = 1
    return Cameras(K=K, R=R, t=t)


def project(joints: np.ndarray, cams: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """(N,J,3) world -> (uv (N,J,2) pixels, depth (N,J) metres along the optical axis)."""
    cam = np.einsum("nij,nkj->nki", cams.R, joints) + cams.t[:, None]
    depth = cam[..., 2]
    uv = np.einsum("nij,nkj->nki", cams.K, cam / depth[..., None])[..., :2]
    return uv, depth


def camera_global_orient(global_orient: np.ndarray, cams: Cameras) -> np.ndarray:
    """Root orientation in the camera frame: axis-angle of ``R_cam @ R_root``: (N,3)."""
    r_root = Rotation.from_rotvec(np.asarray(global_orient, dtype=np.float64)).as_matrix()
    return Rotation.from_matrix(cams.R @ r_root).as_rotvec()


def _render_batch(uv, depth, focal, size, rng, noise):
    """uv (B,24,2), depth (B,24), focal (B,) -> rgb float (B,H,W,3), mask (B,H,W).

    Written with in-place float32 ops: the (B, bones, pixels) arrays dominate the time."""
    b = len(uv)
    centres = np.arange(size, dtype=np.float32) + 0.5
    py, px = np.meshgrid(centres, centres, indexing="ij")
    px, py = px.reshape(1, 1, -1), py.reshape(1, 1, -1)                   # (1,1,P)
    a, e = uv[:, _BONE_A].astype(np.float32), uv[:, _BONE_B].astype(np.float32)  # (B,S,2)
    za, zb = depth[:, _BONE_A].astype(np.float32), depth[:, _BONE_B].astype(np.float32)
    abx, aby = (e - a)[..., 0:1], (e - a)[..., 1:2]
    inv_len2 = 1.0 / np.maximum(abx * abx + aby * aby, 1e-6)               # (B,S,1)
    rx, ry = px - a[..., 0:1], py - a[..., 1:2]                            # (B,S,P)
    s = rx * abx
    s += ry * aby
    s *= inv_len2
    np.clip(s, 0.0, 1.0, out=s)                                            # closest point
    rx -= s * abx
    ry -= s * aby
    d2 = rx * rx
    d2 += ry * ry
    z = s * (zb - za)[..., None]
    z += za[..., None]
    # cover = 1 - (d/r_pix)^2 with r_pix = max(r * f / z, MIN_RADIUS_PX); > 0 inside.
    # The floor keeps thin, far limbs visible: a pixel centre is at most 0.71 px from any
    # point of its pixel, so every joint's own pixel is covered.
    r2 = (focal.astype(np.float32)[:, None, None] * _BONE_R[None, :, None]) ** 2
    r2 = r2 / (z * z)
    np.maximum(r2, MIN_RADIUS_PX ** 2, out=r2)
    cover = d2
    cover /= r2
    np.subtract(1.0, cover, out=cover)
    # z-buffer on the capsule surface (z minus the bulge; cover ~ bulge^2 keeps the order
    # of overlapping capsules right at the joints and saves a full-size sqrt).
    zbuf = np.where(cover > 0, z - _BONE_R[None, :, None] * cover, np.inf)
    k = np.argmin(zbuf, axis=1)                                             # (B,P)
    zmin = np.take_along_axis(zbuf, k[:, None], axis=1)[:, 0]
    mask = np.isfinite(zmin)
    bulge = np.sqrt(np.clip(np.take_along_axis(cover, k[:, None], axis=1)[:, 0], 0, 1))
    near = depth.min(axis=1, keepdims=True) - 0.15
    far = depth.max(axis=1, keepdims=True) + 0.15
    depth_cue = 1.0 - 0.4 * np.clip((np.where(mask, zmin, far) - near) / (far - near), 0, 1)
    shade = (0.35 + 0.65 * bulge) * depth_cue                              # (B,P)
    fg = _BONE_RGB[k] * shade[..., None]                                    # (B,P,3)

    # Background: a dim, weakly tinted grey with a vertical gradient and pixel noise.
    base = rng.uniform(0.08, 0.35, (b, 1, 1, 1)) + rng.uniform(-0.04, 0.04, (b, 1, 1, 3))
    gradient = np.linspace(-0.05, 0.05, size)[None, :, None, None]
    bg = np.broadcast_to(base + gradient, (b, size, size, 3)).reshape(b, -1, 3)
    bg = bg + rng.normal(0, noise, bg.shape)
    rgb = np.where(mask[..., None], fg + rng.normal(0, noise * 0.5, fg.shape), bg)
    return rgb.reshape(b, size, size, 3), mask.reshape(b, size, size)


def render(joints: np.ndarray, cams: Cameras, size: int, rng: np.random.Generator, *,
           background_noise: float = 0.03, batch: int = 32, progress: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Render joints (N,24,3) world through cameras -> (images (N,H,W,3) uint8,
    foreground masks (N,H,W) bool)."""
    uv, depth = project(joints, cams)
    if (depth <= 0.05).any():
        raise ValueError("render: a joint is behind or at the camera (check the cameras)")
    n = len(joints)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    starts = range(0, n, batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="render", unit="batch", leave=False)
    for start in starts:
        sl = slice(start, min(n, start + batch))
        rgb, mask = _render_batch(uv[sl], depth[sl], cams.K[sl, 0, 0], size, rng,
                                  background_noise)
        images[sl] = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
        masks[sl] = mask
    return images, masks
