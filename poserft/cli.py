"""The ``poserft`` command: generate a pose from text or an image, describe a checkpoint.

    poserft generate --text "The person is squatting." --checkpoint results/runs/dist_rft/seed0/rft
    poserft generate --image person.png --checkpoint DIR --samples 4 --out poses.npz --render poses.png
    poserft info results/runs/dist_rft/seed0/rft

``generate`` runs on ``--device`` (auto: the GPU when one is visible, else the CPU) and
prints the answer text of every sample and writes (``--out``, npz) the SMPL
parameters in axis-angle, ``global_orient (S,3)``, ``body_pose (S,23,3)``, ``betas (S,10)``
(zeros: the model predicts pose only), plus ``joints (S,24,3)`` (metres, the body model's
forward kinematics), ``vec6d (S,144)``, ``pose_valid (S,)`` and ``texts (S,)``. One sample
is the greedy answer with the head's mean pose; more samples are drawn at
``--temperature``.

Errors (missing or truncated checkpoint, corrupt tokenizer.json, unreadable image, wrong
image kind, empty ``--text``, an ``--out``/``--render`` file that cannot be written) print one
line naming the path and the fix, and exit with status 1; nothing is written then (``--out``
and ``--render`` are written both or neither). An image much smaller than the model's
vision input (a side under 8 px or under a quarter of the input side) gets a one-line
warning on stderr; the pose is still generated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "CliError", "load_image", "describe_checkpoint", "generate"]

# PIL modes we can turn into 8-bit RGB without guessing (alpha is dropped, grey replicated).
_ACCEPTED_MODES = {"RGB": "RGB", "RGBA": "RGB with alpha", "L": "8-bit grey", "P": "palette"}
_POLICY_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------ inputs --
def _policy_dir(path: str | os.PathLike) -> Path:
    """The policy directory at ``path`` (or its ``final/``), else a CliError with the fix."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"checkpoint {p} does not exist; pass --checkpoint a policy directory "
                       "(model.safetensors, config.json, tokenizer.json), e.g. "
                       "results/runs/dist_rft/seed0/rft")
    if not p.is_dir():
        raise CliError(f"checkpoint {p} is a file, not a directory; pass the folder that holds "
                       "model.safetensors, config.json and tokenizer.json")
    for cand in (p, p / "final"):
        if all((cand / f).is_file() for f in _POLICY_FILES):
            return cand
    missing = [f for f in _POLICY_FILES if not (p / f).is_file()]
    raise CliError(f"checkpoint {p} is not a policy directory (missing {', '.join(missing)}); "
                   "point at the output folder of the sft/rft rule (or re-export it with "
                   "poserft.model.io.save_policy)")


def load_image(path: str | os.PathLike):
    """Image file -> (H,W,3) uint8 RGB array; CliError naming the path and the fix otherwise."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CliError(f"image {p} does not exist; pass --image an RGB PNG or JPEG file")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode not in _ACCEPTED_MODES:
                bands = len(im.getbands())
                raise CliError(f"image {p} has mode {mode!r} ({bands} channel{'s' * (bands != 1)}"
                               f"); expected 8-bit RGB (or RGBA/grey/palette): convert it, e.g. "
                               f"save it as an RGB PNG")
            return np.array(im.convert("RGB"), dtype=np.uint8)   # writable copy
    except UnidentifiedImageError:
        raise CliError(f"image {p} is not a readable image file; pass an RGB PNG or JPEG") from None
    except OSError as exc:
        raise CliError(f"image {p} could not be read ({exc}); pass an intact RGB PNG or JPEG") from None


# ------------------------------------------------------------------------- commands --
def _count_parameters(weights: Path) -> tuple[int, int]:
    """(parameters, tensors) from the safetensors header, without loading the weights."""
    from poserft.model.io import PolicyCheckpointError, read_weights_header

    try:
        shapes = read_weights_header(weights)
    except PolicyCheckpointError as exc:      # truncated / corrupt: names the file and the fix
        raise CliError(str(exc)) from None
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total, len(shapes)


def _check_tokenizer(path: Path) -> None:
    """CliError naming ``path`` and the fix if the tokenizer file is corrupt: ``info`` reads
    only the config and the weights' header otherwise, and would describe a policy that
    cannot be loaded."""
    from poserft.model.io import PolicyTokenizerError, check_tokenizer_file

    try:
        check_tokenizer_file(path)
    except PolicyTokenizerError as exc:
        raise CliError(str(exc)) from None


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def vision_input_size(policy) -> tuple[int, int]:
    """(height, width) the policy resizes images to: the largest of its vision encoders'."""
    sizes = [_pair(policy.backbone.config.vision_config.image_size)]
    if getattr(policy, "pose_encoder", None) is not None:
        sizes.append(_pair(policy.pose_encoder.image_size))
    return max(sizes, key=lambda hw: hw[0] * hw[1])


def small_image_warning(path: str | os.PathLike, shape: Sequence[int],
                        model_hw: tuple[int, int]) -> str | None:
    """A one-line warning if an (H,W,...) image is much smaller than the model's input
    (a side under 8 px or under a quarter of the input side), else None."""
    h, w = int(shape[0]), int(shape[1])
    mh, mw = model_hw
    if min(h, w) >= 8 and 4 * h >= mh and 4 * w >= mw:
        return None
    return (f"image {path} is {w}x{h} px, much smaller than the model's {mw}x{mh} px vision "
            f"input: it is upscaled and the pose will mostly be a guess; pass a larger image "
            f"of the person (at least {max(8, -(-mw // 4))}x{max(8, -(-mh // 4))} px)")


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """Model config, parameter count, vocabulary size and files of a policy directory."""
    d = _policy_dir(path)
    try:
        meta = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{d / 'config.json'} is not valid JSON ({exc}); re-export the policy") from None
    params, tensors = _count_parameters(d / "model.safetensors")
    _check_tokenizer(d / "tokenizer.json")
    files = {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()}
    out = {"path": str(d), "format": meta.get("format"), "version": meta.get("version"),
           "parameters": params, "tensors": tensors, "vocab_size": meta.get("vocab_size"),
           "model": meta.get("model", {}), "files": files}
    summary = d / "rft_summary.json"
    if summary.is_file():
        try:
            out["rft_summary"] = json.loads(summary.read_text())
        except json.JSONDecodeError:
            out["rft_summary"] = "unreadable"
    return out


def _print_info(info: dict) -> None:
    model = info["model"]
    print(f"checkpoint   {info['path']}  ({info['format']} v{info['version']})")
    print(f"parameters   {info['parameters']:,} in {info['tensors']} tensors")
    print(f"vocab size   {info['vocab_size']}")
    keys = ("checkpoint", "head", "covariance", "fusion", "text_hidden_size", "text_layers",
            "clip_image_size")
    print("model        " + ", ".join(f"{k}={model.get(k)}" for k in keys if k in model))
    print("files        " + ", ".join(f"{n} ({s:,} B)" for n, s in info["files"].items()))
    print("config       " + json.dumps(model, sort_keys=True))


def generate(checkpoint: str | os.PathLike, text: str | None = None, image: str | None = None,
             samples: int = 1, temperature: float = 1.0, max_new_tokens: int = 24,
             seed: int = 0, device: str = "auto") -> dict:
    """Run the policy on one prompt -> dict of numpy arrays (see the module docstring).
    ``device``: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    import numpy as np
    import torch

    if (text is None) == (image is None):
        raise CliError("give exactly one of --text or --image")
    if text is not None and not text.strip():
        raise CliError("--text is empty; give a description of the pose, e.g. "
                       "--text \"The person is squatting with the knees bent.\"")
    if samples < 1:
        raise CliError(f"--samples must be >= 1, got {samples}")
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise CliError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    d = _policy_dir(checkpoint)
    pixels = load_image(image) if image is not None else None      # fail before loading
    from poserft.body import load as load_body
    from poserft.body import vec6d_to_smpl
    from poserft.eval.runner import load_policy_on, resolve_device
    from poserft.model.io import PolicyFileError

    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as exc:   # no GPU visible, malformed name
        raise CliError(f"--device {device}: {exc}") from None
    try:
        policy = load_policy_on(d, dev)
    except PolicyFileError as exc:     # names the file and the fix (truncated, incomplete...)
        raise CliError(str(exc)) from None
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CliError(f"checkpoint {d} could not be loaded ({exc}); re-export it with "
                       "poserft.model.io.save_policy") from None
    if pixels is not None:
        warning = small_image_warning(image, pixels.shape, vision_input_size(policy))
        if warning:
            print(f"poserft: warning: {warning}", file=sys.stderr)
    prompt = policy.text2pose_prompt(text) if text is not None else policy.image2pose_prompt()
    images = None if pixels is None else pixels[None]
    greedy = samples == 1
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    with torch.inference_mode():
        roll = policy.generate([prompt], images=images, num_samples=samples,
                               max_new_tokens=max_new_tokens, do_sample=not greedy,
                               temperature=temperature, generator=gen)
        vec = (roll.pose_mean if greedy else roll.pose_sample).float().cpu()
        orient, body_pose = vec6d_to_smpl(vec)
        joints = load_body(None)(orient, body_pose)
    return {"texts": np.array(roll.texts, dtype=object),
            "global_orient": orient.numpy().astype(np.float32),
            "body_pose": body_pose.numpy().astype(np.float32),
            "betas": np.zeros((samples, 10), np.float32),
            "joints": joints.numpy().astype(np.float32),
            "vec6d": vec.numpy().astype(np.float32),
            "pose_valid": roll.pose_valid.cpu().numpy()}


def _save_npz(path: str | os.PathLike, result: dict) -> None:
    """``path``: a temp file from _write_outputs (it ends in .npz, so numpy adds nothing)."""
    import numpy as np

    arrays = {k: v for k, v in result.items() if k != "texts"}
    arrays["texts"] = np.array([str(t) for t in result["texts"]])   # unicode, no pickle
    np.savez(path, **arrays)


def _render(path: str | os.PathLike, result: dict, title: str) -> None:
    from poserft.eval.gallery import render_pose_grid

    labels = [f"sample {i}" + ("" if v else " (no <POSE>)")
              for i, v in enumerate(result["pose_valid"])]
    render_pose_grid(path, [list(result["joints"])], row_labels=[""], col_labels=labels,
                     title=title)


@contextlib.contextmanager
def _naming(what: str):
    """Turn a failure to write an output into a CliError naming ``what`` (option and path)
    and the cause. Any exception: matplotlib and numpy fail in many types."""
    try:
        yield
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"{what}: could not be written ({type(exc).__name__}: {exc}); nothing "
                       "was written: give a path in a writable folder") from None


def _temp_output(stack: contextlib.ExitStack, option: str, path: str, suffix: str) -> Path:
    """A temp file next to ``path`` (atomic_path), moved into place when ``stack`` closes
    without an error and removed otherwise."""
    from poserft.atomic import atomic_path

    with _naming(f"{option} {path}"):      # e.g. its folder cannot be created
        return stack.enter_context(atomic_path(path, suffix=suffix))


def _write_outputs(out: str | None, render: str | None, result: dict, title: str) -> None:
    """Write ``--out`` and ``--render`` both or neither, so a failed render (matplotlib, a
    folder that cannot be created) leaves no npz behind: both are written to temp files next
    to their targets and moved into place only once both are written; a file already at a
    target stays as it was when anything fails."""
    both = " and ".join(f"{o} {p}" for o, p in (("--out", out), ("--render", render)) if p)
    with _naming(both), contextlib.ExitStack() as stack:    # _naming: the final renames
        npz = _temp_output(stack, "--out", out, ".npz") if out else None
        png = _temp_output(stack, "--render", render, ".png") if render else None
        if png is not None:
            with _naming(f"--render {render}"):
                _render(png, result, title)
        if npz is not None:
            with _naming(f"--out {out}"):
                _save_npz(npz, result)


# ----------------------------------------------------------------------------- main --
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poserft", description="Pose-RFT: generate SMPL poses "
                                "from text or images with a trained policy.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a pose from a sentence or an image")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="pose description")
    src.add_argument("--image", help="RGB image file (PNG/JPEG) of one person")
    g.add_argument("--checkpoint", required=True, help="policy directory (sft/rft output)")
    g.add_argument("--samples", type=int, default=1,
                   help="poses to generate (1: greedy answer, head mean; >1: sampled)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--max-new-tokens", type=int, default=24, help="longest answer (tokens)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    g.add_argument("--device", default="auto",
                   help="auto (default: the GPU when one is visible, else the CPU), cpu, cuda "
                        "or cuda:N")
    g.add_argument("--out", help="write SMPL parameters and joints to this .npz")
    g.add_argument("--render", help="draw the generated skeleton(s) to this .png")
    i = sub.add_parser("info", help="describe a checkpoint (config, parameters, vocab, files)")
    i.add_argument("checkpoint", help="policy directory")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            info = describe_checkpoint(args.checkpoint)
            if args.json:
                print(json.dumps(info, indent=2, sort_keys=True))
            else:
                _print_info(info)
            return 0
        if args.out and not args.out.endswith(".npz"):
            raise CliError(f"--out {args.out}: the output is a numpy archive; give a path ending in .npz")
        if args.render and not args.render.lower().endswith(".png"):
            raise CliError(f"--render {args.render}: give a path ending in .png")
        result = generate(args.checkpoint, text=args.text, image=args.image,
                          samples=args.samples, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, seed=args.seed,
                          device=args.device)
        for k, (t, ok) in enumerate(zip(result["texts"], result["pose_valid"])):
            print(f"[{k}] {t}" + ("" if ok else "   (no <POSE>: the pose is not meaningful)"))
        _write_outputs(args.out, args.render, result, args.text or Path(args.image).name)
        for path in (args.out, args.render):
            if path:
                print(f"wrote {path}")
        return 0
    except CliError as exc:
        print(f"poserft: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
