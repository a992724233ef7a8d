"""The real-format smoke world (issue #15, item 5): tiny raw datasets in their published
layouts, served from 127.0.0.1, on which the whole DAG runs (configs/realformat_smoke.yaml).

:func:`write_raw_world` writes, under ``root``:

* ``src/<dataset>/``: each dataset's raw tree as it must look once unpacked into
  ``raw/<dataset>`` (the fixture writers of ``fixtures_realformat`` / ``fixtures_pw3d_bedlam``
  give the file layouts; the poses are then made consistent with real JPEG images drawn of
  them: a skeleton of coloured limbs projected with the dataset's own camera);
* ``serve/<dataset>/<file>``: what the downloader fetches, packed as each dataset is
  published: PoseScript ``posescript_release_v2.zip`` plus the AMASS SMPL+H G sub-dataset
  archives it indexes (``ACCAD.tar.bz2``, ``CMU.tar.bz2``), 3DPW ``sequenceFiles.zip`` +
  ``imageFiles.zip``, Human3.6M as SPIN-style npz files + ``images/`` in one ``.tar.gz``
  (H36M has no public archive of the preprocessed files), COCO-EFT the plain EFT json +
  ``train2014.zip``.

==============  =====================================  ========================================
dataset         splits (pose rows after conversion)    what the world exercises
==============  =====================================  ========================================
posescript      train 47, val 40, test 40              id map -> AMASS frames (SMPL+H G npz),
                (2-3 captions per pose)                human (str) + auto (list) captions, one
                                                       uncaptioned pose dropped, root yaw removed
pw3d            train 48, val 16, test 40              60 Hz pickles (img_frame_ids != row),
                                                       2 actors per image, keypoint crops
h36m            train 42 (96 rows, 12 without SMPL,    has_smpl filter, frame_stride 2, SPIN
                frame_stride 2), test 40 (protocol 2)  boxes; protocol 2 without pose/shape
coco_eft        train 40                               EFT rotation matrices, COCO image names
==============  =====================================  ========================================

Every image/pose pair is consistent: the image is the skeleton of the row's SMPL pose
(skeleton body model) in the row's camera, and the boxes / 2D keypoints the converters read
come from the same projection, so person crops contain the person.

:class:`LoopbackServer` serves ``serve/`` on 127.0.0.1 (HTTP/1.1, Range requests; the
pattern of tests/test_download.py). :func:`smoke_config` turns
``configs/realformat_smoke.yaml`` into the config of one run: its placeholder base URL
``http://127.0.0.1:8765`` replaced by the server's and every archive's SHA-256 pinned.

By hand (writes the world, serves it, runs the whole DAG in ``DIR/work``)::

    .venv/bin/python tests/realformat_world.py /tmp/realformat          # add --cores N
    .venv/bin/python tests/realformat_world.py /tmp/realformat --serve  # serve only (port 8765)
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw
from scipy.spatial.transform import Rotation

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:       # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures_pw3d_bedlam import write_pw3d_sequence_60hz  # noqa: E402
from fixtures_realformat import (  # noqa: E402
    random_rotvecs, write_amass_tree, write_eft_json, write_posescript_release, write_spin_npz)

__all__ = ["CONFIG", "PLACEHOLDER_BASE", "DATASETS", "write_raw_world", "LoopbackServer",
           "smoke_config", "run_dag", "main"]

CONFIG = ROOT / "configs" / "realformat_smoke.yaml"
PLACEHOLDER_BASE = "http://127.0.0.1:8765"       # the committed config's URLs start with it
DATASETS = ("posescript", "pw3d", "h36m", "coco_eft")

# ------------------------------------------------------------------------------ drawing --
_BONES = None


def _bones():
    """(parent index, child index, RGB) of the renderer's limbs (left/right coloured apart)."""
    global _BONES
    if _BONES is None:
        from poserft.data.synthetic.renderer import BONES
        from poserft.data.synthetic.sampler import JOINT_INDEX as J
        _BONES = [(J[a], J[b], tuple(int(255 * c) for c in rgb)) for a, b, _, rgb in BONES
                  if a != b]
    return _BONES


def _body():
    from poserft.body import load
    return load(None)


def _joints(body, go: np.ndarray, bp: np.ndarray, transl: np.ndarray | None = None) -> np.ndarray:
    """Skeleton joints (N,24,3) of axis-angle poses (the converters' body model)."""
    import torch
    with torch.no_grad():
        out = body(torch.as_tensor(go, dtype=torch.float32).reshape(-1, 3),
                   torch.as_tensor(bp, dtype=torch.float32).reshape(-1, 23, 3),
                   transl=None if transl is None else
                   torch.as_tensor(transl, dtype=torch.float32).reshape(-1, 3))
    return out.numpy().astype(np.float64)


def _project(points: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World points (J,3) -> pixels (J,2) (x_cam = R x + t, OpenCV camera)."""
    cam = points @ R.T + t
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:3]


def _draw(size: tuple[int, int], people: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A (W,H) RGB image: a soft gradient background and each person's skeleton (24 pixel
    positions) drawn as coloured limbs and a head disc."""
    w, h = size
    top, bottom = rng.integers(40, 140, 3), rng.integers(90, 200, 3)
    ramp = np.linspace(0.0, 1.0, h)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1).astype(np.uint8)
    image = Image.fromarray(bg)
    pen = ImageDraw.Draw(image)
    for uv in people:
        for a, b, rgb in _bones():
            pen.line([tuple(uv[a]), tuple(uv[b])], fill=rgb, width=3)
        hx, hy = uv[15]
        pen.ellipse([hx - 4, hy - 4, hx + 4, hy + 4], fill=(235, 200, 160))
    return image


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def _upright_camera(rng: np.random.Generator, n: int, jitter: float = 0.1) -> np.ndarray:
    """(n,3,3) world(y up)->camera(y down) rotations: 180 deg about x, slightly perturbed."""
    flip = Rotation.from_euler("x", np.pi)
    return (flip * Rotation.from_rotvec(random_rotvecs(rng, (n,), jitter))).as_matrix()


def _box(uv: np.ndarray, enlarge: float = 1.2) -> tuple[np.ndarray, float]:
    """SPIN box of 2D joints (J,2): centre (2,) and scale (side / 200)."""
    lo, hi = uv.min(0), uv.max(0)
    return (lo + hi) / 2, float(enlarge * (hi - lo).max() / 200.0)


# --------------------------------------------------------------------------- datasets --
def _posescript(src: Path, rng: np.random.Generator, body, seed: int) -> dict:
    """PoseScript release + the AMASS SMPL+H G sequences it indexes (under the same root).

    Captions are the synthetic captioner's sentences of each pose as the converter will
    store it (AMASS frame -> y-up, root yaw removed), so text and pose agree."""
    from poserft.data.converters.amass import amass_to_canonical
    from poserft.data.synthetic.captioner import caption_poses, value_weights
    from poserft.data.synthetic.posecodes import compute_posecodes

    amass = write_amass_tree(src, {"ACCAD": 2, "CMU": 2}, n_frames=40, fps=60.0, seed=seed)
    # val and test: > 32 poses each (retrieval's sampled protocol draws 31 distractors)
    splits = {"train": list(range(0, 48)), "val": list(range(48, 88)),
              "test": list(range(88, 128))}
    id_map = write_posescript_release(src, amass, splits, human={}, auto={}, seed=seed)
    n = len(id_map)
    go, bp = np.zeros((n, 3)), np.zeros((n, 23, 3))
    for pid, (_, seq, frame) in id_map.items():
        d = amass[seq]
        canon = amass_to_canonical(d["poses"][frame:frame + 1], d["trans"][frame:frame + 1],
                                   d["betas"], body, True)
        go[pid], bp[pid] = canon["global_orient"][0], canon["body_pose"][0]
    joints = _joints(body, go, bp)
    joints[..., 1] -= joints[..., 1].min(axis=1, keepdims=True)       # on the ground
    codes = compute_posecodes(joints)
    texts, index = caption_poses(codes, rng, 3, 3, 6, value_weights(codes))
    per_pose: dict[int, list[str]] = {}
    for text, pid in zip(texts, index):
        per_pose.setdefault(int(pid), []).append(text)
    uncaptioned = 47                    # a train pose without captions: dropped by the converter
    human = {pid: caps[0] for pid, caps in per_pose.items() if pid % 3 == 0 and pid != uncaptioned}
    auto = {pid: caps[1:] if pid in human else caps[:2]
            for pid, caps in per_pose.items() if pid != uncaptioned}
    for file, captions in (("posescript_human_6293.json", human),
                           ("posescript_auto_100k.json", auto)):
        (src / file).write_text(json.dumps({str(k): v for k, v in captions.items()}))
    n_captions = {s: sum((pid in human) + len(auto.get(pid, [])) for pid in ids)
                  for s, ids in splits.items()}
    release = sorted(p.name for p in src.glob("*.json"))
    return {"rows": {"train": 47, "val": 40, "test": 40}, "captions": n_captions,
            "archives": {"posescript_release_v2.zip": ("zip", release),
                         "ACCAD.tar.bz2": ("tar.bz2", ["ACCAD"]),
                         "CMU.tar.bz2": ("tar.bz2", ["CMU"])}}


_PW3D = {"train": {"courtyard_basketball_00": 12, "outdoors_climbing_00": 12},
         "validation": {"courtyard_drinking_00": 8},
         "test": {"downtown_walking_00": 10, "flat_guitar_01": 10}}
_PW3D_SIZE = (96, 128)                                   # W, H (3DPW frames are portrait)
_PW3D_K = np.array([[180.0, 0.0, 48.0], [0.0, 180.0, 64.0], [0.0, 0.0, 1.0]])


def _pw3d(src: Path, rng: np.random.Generator, body, seed: int) -> dict:
    """3DPW pickles of the official release (60 Hz arrays, img_frame_ids into them), two
    actors side by side, with a camera that sees them upright, and imageFiles/ JPEGs."""
    k = 0
    for folder, seqs in _PW3D.items():
        for name, n_frames in seqs.items():
            k += 1
            path = src / "sequenceFiles" / folder / f"{name}.pkl"
            data = write_pw3d_sequence_60hz(path, name, n_frames=n_frames, n_actors=2,
                                            seed=seed + k, offset=3)
            R = _upright_camera(rng, n_frames)
            cam = np.tile(np.eye(4), (n_frames, 1, 1))
            cam[:, :3, :3] = R
            cam[:, :3, 3] = np.array([0.0, 0.0, 4.0]) + rng.normal(size=(n_frames, 3)) * 0.05
            data["cam_poses"], data["cam_intrinsics"] = cam, _PW3D_K.copy()
            ids = data["img_frame_ids"]
            joints_of = []
            for a in range(2):
                trans = np.array([-0.45 if a == 0 else 0.45, 0.2, 0.0]) + \
                    rng.normal(size=(n_frames, 3)) * 0.03
                data["trans"][a] = trans
                data["trans_60Hz"][a][ids] = trans
                j = _joints(body, data["poses"][a][:, :3], data["poses"][a][:, 3:], trans)
                data["jointPositions"][a] = j.reshape(n_frames, 72)
                joints_of.append(j)
            with open(path, "wb") as fh:
                pickle.dump(data, fh, protocol=2)
            for i in range(n_frames):
                people = [_project(joints_of[a][i], _PW3D_K, R[i], cam[i, :3, 3]) for a in range(2)]
                _save_jpeg(_draw(_PW3D_SIZE, people, rng),
                           src / "imageFiles" / name / f"image_{i:05d}.jpg")
    rows = {ours: 2 * sum(_PW3D[theirs].values())
            for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test"))}
    return {"rows": rows, "archives": {"sequenceFiles.zip": ("zip", ["sequenceFiles"]),
                                       "imageFiles.zip": ("zip", ["imageFiles"])}}


_H36M_SIZE = (112, 112)
_H36M_K = np.array([[220.0, 0.0, 56.0], [0.0, 220.0, 56.0], [0.0, 0.0, 1.0]])


def _spin24(body, go: np.ndarray, bp: np.ndarray, transl: np.ndarray) -> np.ndarray:
    """(N,24,3) joints in SPIN's 24-joint order: LSP-14, then pelvis, thorax, spine, jaw,
    head, nose, eyes, ears (the face joints approximated by the SMPL head)."""
    import torch
    with torch.no_grad():
        lsp = body.joint_set("lsp14", torch.as_tensor(go, dtype=torch.float32),
                             torch.as_tensor(bp, dtype=torch.float32).reshape(-1, 23, 3),
                             transl=torch.as_tensor(transl, dtype=torch.float32)).numpy()
    smpl = _joints(body, go, bp, transl)
    extra = smpl[:, [0, 12, 6, 15, 15, 15, 15, 15, 15, 15]]
    return np.concatenate([lsp, extra], axis=1)


def _h36m_rows(src: Path, rng: np.random.Generator, body, n: int, prefix: str) -> dict:
    """n SPIN-style rows (camera-frame SMPL, S, part, box) and their images."""
    yaw = Rotation.from_euler("y", rng.uniform(-np.pi, np.pi, (n, 1)))
    root = Rotation.from_matrix(_upright_camera(rng, n)) * yaw
    go = root.as_rotvec()
    bp = random_rotvecs(rng, (n, 23), 0.3).astype(np.float64)
    transl = np.array([0.0, -0.2, 4.5]) + rng.normal(size=(n, 3)) * np.array([0.1, 0.05, 0.2])
    S = _spin24(body, go, bp, transl)
    uv = np.stack([_project(s, _H36M_K, np.eye(3), np.zeros(3)) for s in S])
    smpl_uv = np.stack([_project(j, _H36M_K, np.eye(3), np.zeros(3))
                        for j in _joints(body, go, bp, transl)])
    names = [f"images/{prefix}_{i + 1:06d}.jpg" for i in range(n)]
    center, scale = np.zeros((n, 2)), np.zeros(n)
    for i in range(n):
        center[i], scale[i] = _box(smpl_uv[i])
        _save_jpeg(_draw(_H36M_SIZE, [smpl_uv[i]], rng), src / names[i])
    return {"imgname": np.array(names), "center": center, "scale": scale,
            "pose": np.concatenate([go, bp.reshape(n, 69)], axis=1), "shape": np.zeros((n, 10)),
            "S": np.concatenate([S, np.ones((n, 24, 1))], -1),
            "part": np.concatenate([uv, np.ones((n, 24, 1))], -1)}


def _h36m(src: Path, rng: np.random.Generator, body, seed: int) -> dict:
    """SPIN's h36m_train.npz (with has_smpl) and h36m_valid_protocol2.npz (imgname, center,
    scale, S only), images under images/."""
    train = _h36m_rows(src, rng, body, 96, "S1_Walking.54138969")
    has_smpl = (np.arange(96) % 8 != 7).astype(np.float64)
    write_spin_npz(src / "h36m_train.npz", n=96, seed=seed, has_smpl=has_smpl, **train)
    test = _h36m_rows(src, rng, body, 40, "S9_Walking.55011271")
    write_spin_npz(src / "h36m_valid_protocol2.npz", n=40, seed=seed + 1,
                   **{**test, "pose": None, "shape": None, "part": None})
    kept = int(has_smpl.sum())
    return {"rows": {"train": (kept + 1) // 2, "test": 40},
            "archives": {"h36m_spin_smoke.tar.gz": (
                "tar.gz", ["h36m_train.npz", "h36m_valid_protocol2.npz", "images"])}}


_COCO_SIZE = (128, 96)


def _coco_eft(src: Path, rng: np.random.Generator, body, seed: int) -> dict:
    """EFT fits (COCO2014-All-ver01.json, rotation matrices, camera-frame root) and the
    COCO train2014 images they name."""
    path = src / "COCO2014-All-ver01.json"
    data = write_eft_json(path, n=40, seed=seed, coco=True)
    K = np.array([[190.0, 0.0, 64.0], [0.0, 190.0, 48.0], [0.0, 0.0, 1.0]])
    for i, item in enumerate(data["data"]):
        rot = np.asarray(item["parm_pose"])
        rot[0] = (Rotation.from_matrix(_upright_camera(rng, 1)[0])
                  * Rotation.from_euler("y", rng.uniform(-np.pi, np.pi))).as_matrix()
        bp = Rotation.from_matrix(rot[1:]).as_rotvec() * 0.6          # milder limbs
        rot[1:] = Rotation.from_rotvec(bp).as_matrix()
        go = Rotation.from_matrix(rot[0]).as_rotvec()
        transl = np.array([rng.uniform(-0.4, 0.4), -0.2, 5.0])
        uv = _project(_joints(body, go[None], bp[None], transl[None])[0], K, np.eye(3), np.zeros(3))
        center, scale = _box(uv)
        item.update(parm_pose=rot.tolist(), bbox_center=center.tolist(), bbox_scale=scale)
        _save_jpeg(_draw(_COCO_SIZE, [uv], rng), src / "train2014" / item["imageName"])
    path.write_text(json.dumps(data))
    return {"rows": {"train": 40},
            "archives": {"COCO2014-All-ver01.json": ("plain", ["COCO2014-All-ver01.json"]),
                         "train2014.zip": ("zip", ["train2014"])}}


_WRITERS = {"posescript": _posescript, "pw3d": _pw3d, "h36m": _h36m, "coco_eft": _coco_eft}


# ---------------------------------------------------------------------------- archives --
def _members(src: Path, entries: list[str]) -> list[tuple[str, Path]]:
    """(archive name, file) of every file under the listed entries, sorted."""
    out = []
    for entry in entries:
        p = src / entry
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        out += [(f.relative_to(src).as_posix(), f) for f in files]
    return out


def _pack(kind: str, src: Path, entries: list[str], dest: Path) -> None:
    """Pack ``entries`` of ``src`` into ``dest`` (fixed timestamps: same bytes each time
    for the same inputs)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    members = _members(src, entries)
    if kind == "plain":
        (name, f), = members
        dest.write_bytes(f.read_bytes())
    elif kind == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, f in members:
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), f.read_bytes())
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, f in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = f.stat().st_size, 0, 0o644
                with open(f, "rb") as fh:
                    tf.addfile(info, fh)
        raw = buf.getvalue()
        if kind == "tar.gz":
            with open(dest, "wb") as fh, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
                gz.write(raw)
        elif kind == "tar.bz2":
            dest.write_bytes(bz2.compress(raw))
        else:
            raise ValueError(f"unknown archive kind {kind!r}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_raw_world(root: Path, seed: int = 0, datasets: tuple[str, ...] = DATASETS) -> dict:
    """Write the raw world under ``root`` (see the module docstring).

    Returns ``{dataset: {"rows": {split: pose rows after conversion}, "files": {file name:
    {"path", "sha256", "url_path"}}, ...}}`` (posescript also has ``"captions"``: captions
    per split): what the config needs (file names, SHA-256) and what a test can check the
    converted splits against.
    """
    root = Path(root)
    body = _body()
    world: dict = {}
    for k, name in enumerate(datasets):
        rng = np.random.default_rng([seed, k])
        src = root / "src" / name
        src.mkdir(parents=True, exist_ok=True)
        info = _WRITERS[name](src, rng, body, seed)
        files = {}
        for file_name, (kind, entries) in info.pop("archives").items():
            dest = root / "serve" / name / file_name
            _pack(kind, src, entries, dest)
            files[file_name] = {"path": dest, "sha256": _sha256(dest),
                                "url_path": f"/{name}/{file_name}"}
        world[name] = {**info, "files": files}
    return world


# ------------------------------------------------------------------------------ server --
class _Handler(BaseHTTPRequestHandler):
    """GET of a file under the server's ``directory``; honours ``Range: bytes=N-``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def _empty(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        srv = self.server
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = (srv.directory / rel).resolve()
        if srv.directory not in path.parents or not path.is_file():
            self._empty(404)
            return
        body = path.read_bytes()
        start = 0
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(body):
                self._empty(416)
                return
        with srv.lock:
            srv.requests.append(self.path)
        payload = body[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class LoopbackServer:
    """Serve ``directory`` on 127.0.0.1 (port 0: a free one) from a daemon thread.

    ``with LoopbackServer(root / "serve") as srv: srv.base`` -> ``http://127.0.0.1:<port>``;
    ``srv.requests`` lists the paths served.
    """

    def __init__(self, directory: Path, port: int = 0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.directory = Path(directory).resolve()
        self.httpd.requests, self.httpd.lock = [], threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        with self.httpd.lock:
            return list(self.httpd.requests)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# ------------------------------------------------------------------------------ config --
def smoke_config(world: dict, base_url: str, path: Path = CONFIG) -> dict:
    """configs/realformat_smoke.yaml with its URLs on ``base_url`` and every file's SHA-256
    pinned (``datasets.<name>.sha256``). Datasets of the config missing from ``world``
    are an error (the config would download nothing there)."""
    cfg = yaml.safe_load(path.read_text())
    ds = cfg["datasets"]
    for name in ds["enabled"]:
        if name not in world:
            raise KeyError(f"{path}: dataset {name!r} is enabled but not in the written world")
        section = ds[name]
        section["urls"] = [u.replace(PLACEHOLDER_BASE, base_url.rstrip("/"), 1)
                           for u in section["urls"]]
        files = world[name]["files"]
        names = [u.rsplit("/", 1)[-1] for u in section["urls"]]
        if sorted(names) != sorted(files):
            raise KeyError(f"{path}: datasets.{name}.urls name {sorted(names)} but the world "
                           f"serves {sorted(files)}")
        section["sha256"] = {f: files[f]["sha256"] for f in names}
    return cfg


def run_dag(workdir: Path, config: dict, *args: str, cores: int = 2, timeout: float = 1800,
            capture: bool = True) -> subprocess.CompletedProcess:
    """``snakemake --cores N all`` of this repository's Snakefile in ``workdir`` with
    ``config`` as its config.yaml (standalone: the Snakefile's ``configfile: config.yaml``
    resolves in the working directory). MLFLOW_TRACKING_URI is dropped: the runs go to
    ``workdir/results/mlflow.db``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "-s", str(ROOT / "Snakefile"),
           "-d", str(workdir), *args, "all"]
    return subprocess.run(cmd, cwd=workdir, env=env, timeout=timeout, text=True,
                          capture_output=capture)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path,
                    help="scratch folder (raw world in DIR/world, the run in DIR/work)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true",
                    help=f"only write the world and serve it on {PLACEHOLDER_BASE} until Ctrl-C "
                         "(then run snakemake yourself with configs/realformat_smoke.yaml: its "
                         "URLs are unpinned, so the downloader writes each <file>.sha256)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    world = write_raw_world(args.dir / "world", seed=args.seed)
    print(f"raw world written in {time.perf_counter() - t0:.1f} s: {args.dir / 'world'}")
    port = int(PLACEHOLDER_BASE.rsplit(":", 1)[1]) if args.serve else 0
    with LoopbackServer(args.dir / "world" / "serve", port=port) as srv:
        if args.serve:
            print(f"serving {args.dir / 'world' / 'serve'} on {srv.base}; Ctrl-C stops")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        cfg = smoke_config(world, srv.base)
        t0 = time.perf_counter()
        proc = run_dag(args.dir / "work", cfg, cores=args.cores, capture=False)
        print(f"snakemake exited {proc.returncode} after {time.perf_counter() - t0:.0f} s; "
              f"results in {args.dir / 'work' / 'results'}")
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
