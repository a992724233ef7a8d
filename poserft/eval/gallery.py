"""Gallery of generated poses: fixed text prompts x checkpoints (SFT, RFT steps, final RFT).

Poses are drawn with the project's skeleton renderer
(:mod:`poserft.data.synthetic.renderer`, shaded capsules, left limbs warm / right limbs cool
colours) from a fixed front camera, so cells are comparable across checkpoints.

* :func:`gallery_checkpoints`: which policies to show for one variant/seed: its SFT
  policy, the complete intermediate RFT checkpoints (``<rft_checkpoints>/checkpoints/
  step_*/state.pt``, torch backend) and the final RFT policy.
* :func:`generate_gallery_poses`: greedy pose (head mean) per prompt and checkpoint.
* :func:`render_pose_grid`: the PNG.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from poserft.atomic import atomic_path

__all__ = ["GalleryEntry", "front_cameras", "render_skeletons", "render_pose_grid",
           "gallery_checkpoints", "generate_gallery_poses", "build_gallery"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class GalleryEntry:
    """One gallery row: a policy directory, optionally with a checkpoint's weights on top."""

    label: str
    policy_dir: Path
    state_file: Path | None = None   # engine checkpoint state.pt whose "model" replaces the weights


# ---------------------------------------------------------------------------- render --
def front_cameras(joints: np.ndarray, size: int, elevation_deg: float = 10.0,
                  focal_scale: float = 1.4, fill: float = 0.85):
    """Look-at cameras in front of each pose (+z, the SMPL facing direction), framing it.

    joints (N,24,3) metres, y up -> :class:`poserft.data.synthetic.renderer.Cameras`.
    """
    from poserft.data.synthetic.renderer import Cameras

    joints = np.asarray(joints, dtype=np.float64)
    n = len(joints)
    target = (joints.min(axis=1) + joints.max(axis=1)) / 2
    radius = np.linalg.norm(joints - target[:, None], axis=-1).max(axis=1) + 0.12
    f = size * focal_scale
    dist = np.maximum(2 * radius * f / (fill * size), radius + 0.3)
    el = np.radians(elevation_deg)
    centre = target + dist[:, None] * np.array([0.0, np.sin(el), np.cos(el)])
    forward = (target - centre) / np.linalg.norm(target - centre, axis=1, keepdims=True)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward], axis=1)               # rows: camera axes (OpenCV)
    t = -np.einsum("nij,nj->ni", rot, centre)
    k = np.tile(np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]]), (n, 1, 1))
    return Cameras(K=k, R=rot, t=t)


def render_skeletons(joints: np.ndarray, size: int = 128) -> np.ndarray:
    """(N,24,3) joints -> (N,size,size,3) uint8 front views (fixed background, no noise)."""
    from poserft.data.synthetic.renderer import render

    joints = np.asarray(joints, dtype=np.float64)
    images, _ = render(joints, front_cameras(joints, size), size, np.random.default_rng(0),
                       background_noise=0.0)
    return images


def render_pose_grid(out_png: str | os.PathLike, joints_grid: Sequence[Sequence[np.ndarray]],
                     row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                     invalid: Sequence[Sequence[bool]] | None = None, size: int = 128) -> Path:
    """Rows x columns of rendered skeletons (each cell (24,3) joints) -> PNG (atomic).

    ``invalid[r][c]`` marks cells whose answer had no ``<POSE>`` (drawn, but flagged).
    """
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows, cols = len(joints_grid), max((len(r) for r in joints_grid), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("render_pose_grid: nothing to draw (no rows or columns)")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"render_pose_grid: {rows}x{cols} grid but {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    flat = np.stack([np.asarray(j) for r in joints_grid for j in r])
    images = render_skeletons(flat, size)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows + 0.4), squeeze=False)
    k = 0
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(joints_grid[r]):
                ax.imshow(images[k])
                k += 1
                if invalid is not None and invalid[r][c]:
                    ax.text(0.03, 0.05, "no <POSE>", transform=ax.transAxes, color="red",
                            fontsize=7)
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(col_labels[c], 24)), fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out_png)


# ------------------------------------------------------------------------ checkpoints --
def gallery_checkpoints(variant: str, sft_dir: str | os.PathLike, rft_dir: str | os.PathLike | None,
                        rft_checkpoint_dir: str | os.PathLike | None = None,
                        sft_variant: str | None = None) -> list[GalleryEntry]:
    """SFT, the complete intermediate RFT checkpoints that exist, and the final RFT policy.

    ``sft_variant`` names the variant that trained the SFT policy (``sft_from``; default
    ``variant``). Checkpoints at or after the final optimizer step (``rft_summary.json``)
    are the final policy again and are left out; DeepSpeed checkpoints (no ``state.pt``)
    are skipped. Labels count RL steps (``rft.steps``; the checkpoint directories count
    optimizer steps, ``rft.mu`` per RL step) when the summary gives both counts, else
    optimizer steps, said so.
    """
    entries = [GalleryEntry(f"{sft_variant or variant}: SFT", Path(sft_dir))]
    if rft_dir is None:
        return entries
    rft_dir = Path(rft_dir)
    final_step, per_rl_step = None, None
    summary = rft_dir / "rft_summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        final_step = info.get("optimizer_steps")
        if final_step and info.get("rl_steps"):
            # checkpoints are named by optimizer step, rft.mu of them per RL step; a reader
            # compares galleries with rft.steps, which counts RL steps
            per_rl_step = final_step / info["rl_steps"]

    def step_label(step: int) -> str:
        if per_rl_step is None:
            return f"optimizer step {step}"
        return f"step {round(step / per_rl_step)}"

    if rft_checkpoint_dir is not None and (Path(rft_checkpoint_dir) / "checkpoints").is_dir():
        for d in sorted((Path(rft_checkpoint_dir) / "checkpoints").iterdir()):
            m = _STEP_DIR.match(d.name)
            if not m or not (d / "COMPLETE").is_file() or not (d / "state.pt").is_file():
                continue
            step = int(m[1])
            if final_step is not None and step >= final_step:
                continue
            entries.append(GalleryEntry(f"{variant}: RFT {step_label(step)}", Path(sft_dir),
                                        d / "state.pt"))
    label = f"{variant}: RFT final" + (f" ({step_label(final_step)})" if final_step is not None else "")
    entries.append(GalleryEntry(label, rft_dir))
    return entries


def _load(entry: GalleryEntry):
    import torch

    from poserft.model.io import load_policy

    policy = load_policy(entry.policy_dir)
    if entry.state_file is not None:
        # our own engine checkpoint (model + optimizer + RNG state): not a foreign pickle
        state = torch.load(entry.state_file, map_location="cpu", weights_only=False)
        missing, unexpected = policy.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise ValueError(f"{entry.state_file}: checkpoint weights do not fit the policy of "
                             f"{entry.policy_dir} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return policy.eval()


def generate_gallery_poses(entries: Sequence[GalleryEntry], prompts: Sequence[str],
                           max_new_tokens: int = 24, body_cfg=None
                           ) -> tuple[list[list[np.ndarray]], list[list[bool]]]:
    """Greedy pose (head mean) per (entry, prompt): joints (24,3) grid and validity grid."""
    import torch

    from poserft.body import load as load_body

    body = load_body(body_cfg)
    joints, valid = [], []
    for entry in entries:
        policy = _load(entry)
        with torch.inference_mode():
            roll = policy.generate([policy.text2pose_prompt(p) for p in prompts],
                                   max_new_tokens=max_new_tokens, do_sample=False)
            j = body.forward_vec6d(roll.pose_mean.cpu()).numpy()
        joints.append(list(j))
        valid.append(roll.pose_valid.cpu().tolist())
        del policy
    return joints, [[not v for v in row] for row in valid]


def build_gallery(entries: Sequence[GalleryEntry], prompts: Sequence[str],
                  out_png: str | os.PathLike, body_cfg=None, max_new_tokens: int = 24) -> Path:
    """Generate and render the gallery of ``prompts`` x ``entries`` (duplicate entries, e.g.
    one SFT policy shared by several RFT variants, are drawn once)."""
    seen, unique = set(), []
    for e in entries:
        if (e.policy_dir, e.state_file) not in seen:
            seen.add((e.policy_dir, e.state_file))
            unique.append(e)
    entries = unique
    if not prompts:
        raise ValueError("build_gallery: report.gallery_prompts is empty; give at least one prompt")
    if not entries:
        raise ValueError("build_gallery: no checkpoints to show")
    joints, invalid = generate_gallery_poses(entries, prompts, max_new_tokens, body_cfg)
    return render_pose_grid(out_png, joints, [e.label for e in entries], list(prompts),
                            title="Generated poses (greedy, head mean) for fixed prompts",
                            invalid=invalid)
