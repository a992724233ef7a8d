"""The ``datasets`` config section: where each real dataset comes from and how it is converted.

One sub-section per source, each a :class:`DatasetSource` subclass whose *defaults* and
help texts are specific to that dataset (URLs, expected files, splits, where to register),
so a partial override in ``config.yaml`` (``datasets: {amass: {root: /scratch/amass}}``)
keeps the other dataset-specific defaults.

The embedded default enables none of them (``enabled: []``): the workflow then runs on the
synthetic world only. Datasets marked ``manual: true`` need a registration or a licence;
the download rule then only checks that the expected files are in ``root`` and prints
where to get them.

Stdlib-only (imported by the Snakefile at parse time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal
from urllib.parse import urlsplit

from poserft.configbase import ConfigError, Section, option

__all__ = ["DatasetSource", "DatasetsConfig", "DATASET_NAMES", "source_section", "AmassSource",
           "PoseScriptSource", "Pw3dSource", "H36mSource", "MpiInf3dhpSource", "EftSource",
           "CocoEftSource", "MpiiEftSource", "BedlamScriptSource", "LlavaInstructSource"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class DatasetSource(Section):
    """Where one dataset comes from (download/registration) and how it is converted."""

    homepage: str = option("", "Where to get the dataset (registration / licence page).")
    manual: bool = option(
        False, "true: the dataset needs a registration or licence; nothing is downloaded, "
               "the download step checks that `files` exist under `root` and prints where to "
               "get them. false: `urls` are fetched automatically.")
    urls: list[str] = option([], "Files to download into `root` (http/https).")
    sha256: dict[str, str] = option(
        {}, "Expected SHA-256 (64 lowercase hex digits) per downloaded file name (the last "
            "path component of the URL). A mismatch deletes the file and fails. A URL without "
            "an entry is downloaded unpinned: its hash is printed and written next to it "
            "(`<file>.sha256`) so that it can be pinned here.")
    auth: Literal["none", "netrc", "env"] = option(
        "none", "How to authenticate downloads: 'none'; 'netrc': HTTP Basic credentials of "
                "the URL's host from ~/.netrc (or $NETRC); 'env': HTTP Basic credentials "
                "from the environment variables named by `username_env`/`password_env`. "
                "Credentials are never written to logs, errors or MLflow.",
        choices=("none", "netrc", "env"))
    username_env: str = option("", "Environment variable holding the user name (auth: env).")
    password_env: str = option("", "Environment variable holding the password or token (auth: env).")
    extract: bool = option(True, "Unpack downloaded .zip/.tar/.tar.gz/.tgz archives into `root`.")
    root: str = option(
        "", "Folder holding the raw dataset (downloads land here; manual datasets must be "
            "placed here). Empty: <raw_dir>/<dataset name> (raw/<name>).")
    files: list[str] = option(
        [], "Paths (files or folders) relative to `root` that must exist before conversion.")
    splits: dict[str, list[str]] = option(
        {}, "Our split name -> the source's selectors for it (dataset-specific meaning, "
            "see the dataset's section help).")
    image_root: str = option(
        "", "Folder that the dataset's relative image names are joined to when writing "
            "/image_paths. Empty: `root`.")
    frame_stride: int = option(
        1, "Keep every k-th frame of video-derived data (1: all).", minimum=1)
    max_samples: int = option(
        0, "Keep at most this many pose rows per split after subsampling (0: all). For quick "
           "trial conversions only.", minimum=0)

    def check(self, where: str) -> None:
        for i, url in enumerate(self.urls):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"{where}.urls[{i}]: {url!r} is not an http(s) URL")
            if parts.username or parts.password:
                raise ConfigError(
                    f"{where}.urls[{i}]: credentials must not be embedded in the URL (they "
                    f"would end up in logs); use {where}.auth: env or netrc")
        names = {url_file_name(u) for u in self.urls}
        if len(names) != len(self.urls):
            raise ConfigError(f"{where}.urls: two URLs end in the same file name")
        for name, digest in self.sha256.items():
            if name not in names:
                raise ConfigError(f"{where}.sha256.{name}: no URL in {where}.urls ends in "
                                  f"this file name; known: {sorted(names)}")
            if not _SHA256.match(digest):
                raise ConfigError(f"{where}.sha256.{name}: {digest!r} is not a 64-digit "
                                  "lowercase hex SHA-256")
        if self.auth == "env":
            for key in ("username_env", "password_env"):
                value = getattr(self, key)
                if not _ENV_NAME.match(value):
                    raise ConfigError(f"{where}.{key}: {where}.auth is 'env', so give the "
                                      f"NAME of an environment variable (got {value!r})")
        if not self.manual and not self.urls and not self.files:
            raise ConfigError(f"{where}: neither urls to download nor files to check; set "
                              f"{where}.urls or {where}.manual: true with {where}.files")
        for split, selectors in self.splits.items():
            if not selectors:
                raise ConfigError(f"{where}.splits.{split}: empty list; remove the split or "
                                  "name its source selectors")


def url_file_name(url: str) -> str:
    """Last path component of ``url`` (what the file is saved as)."""
    name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    return name or "index"


# ----------------------------------------------------------------------------- per dataset

_AMASS_SPLITS = {
    # The AMASS paper / VPoser split by sub-dataset, all in the folder names of the SMPL+H G
    # release (the names PoseScript's id map uses). The current release's names (BMLrub,
    # HDM05, PosePrior, MoSh, Transitions, SSM, TCDHands, ...) are accepted for these too
    # (poserft.data.converters.amass.AMASS_RELEASE_NAMES).
    "train": ["CMU", "MPI_Limits", "TotalCapture", "Eyes_Japan_Dataset", "KIT",
              "BioMotionLab_NTroje", "EKUT", "TCD_handMocap", "ACCAD"],
    "val": ["HumanEva", "MPI_HDM05", "SFU", "MPI_mosh"],
    "test": ["Transitions_mocap", "SSM_synced"],
}


@dataclass
class AmassSource(DatasetSource):
    """AMASS motion capture (SMPL+H G), poses only (no captions)."""

    homepage: str = option(
        "https://amass.is.tue.mpg.de", "AMASS: register at https://amass.is.tue.mpg.de, "
        "download the 'SMPL+H G' archive of each sub-dataset and unpack them into `root` so "
        "that `root/<SubDataset>/<subject>/<sequence>_poses.npz` exist (either release's "
        "folder names, e.g. BioMotionLab_NTroje or BMLrub).")
    manual: bool = option(True, "AMASS needs a registration (manual download).")
    files: list[str] = option(
        [], "Paths that must exist under `root` before conversion. Empty by default: the "
            "converter itself looks for each split's sub-dataset folders (under either AMASS "
            "release's name), converts those present and fails only when none of a split's "
            "is there.")
    splits: dict[str, list[str]] = option(
        _AMASS_SPLITS, "Our split -> AMASS sub-dataset folders (default: the AMASS/VPoser "
                       "split by sub-dataset). Either release's folder name may be given "
                       "(BioMotionLab_NTroje/BMLrub, MPI_HDM05/HDM05, MPI_Limits/PosePrior, "
                       "MPI_mosh/MoSh, Transitions_mocap/Transitions, SSM_synced/SSM, "
                       "TCD_handMocap/TCDHands, DFaust_67/DFaust); listed sub-datasets absent "
                       "under `root` are skipped with a warning.")
    target_fps: float = option(
        10.0, "Subsample each sequence from its mocap_framerate to about this rate "
              "(0: keep every frame; paper-scale runs typically use 30).", minimum=0)
    remove_root_yaw: bool = option(
        False, "Store the root orientation with its heading (rotation about the vertical "
               "axis) removed, as PoseScript does for retrieval.")


@dataclass
class PoseScriptSource(DatasetSource):
    """PoseScript captions on AMASS poses (text <-> pose)."""

    homepage: str = option(
        "https://github.com/naver/posescript/blob/main/src/text2pose/posescript/README.md",
        "PoseScript (CC BY-NC-SA 4.0): accept the licence, download posescript_release_v2.zip "
        "(https://download.europe.naverlabs.com/ComputerVision/PoseScript/"
        "posescript_release_v2.zip) and unpack it into `root`. The poses themselves come from "
        "AMASS (see `amass_root`).")
    manual: bool = option(True, "PoseScript is licence-gated (manual download).")
    files: list[str] = option(
        ["ids_2_dataset_sequence_and_frame_index_100k.json", "train_ids_100k.json",
         "val_ids_100k.json", "test_ids_100k.json", "posescript_human_6293.json",
         "posescript_auto_100k.json"],
        "Release files that must exist under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["train"], "val": ["val"], "test": ["test"]},
        "Our split -> PoseScript split names (read from `<name>_ids_100k.json`).")
    caption_files: list[str] = option(
        ["posescript_human_6293.json", "posescript_auto_100k.json"],
        "Caption files (pose id -> caption or list of captions) joined to the poses: "
        "posescript_human_6293.json (PoseScript-H2, human-written) and/or "
        "posescript_auto_100k.json (PoseScript-A2, automatic).")
    amass_root: str = option(
        "", "AMASS root (SMPL+H G) that the PoseScript sequence paths are relative to. "
            "Empty: the AMASS root of this config (datasets.amass.root or <raw_dir>/amass).")
    drop_uncaptioned: bool = option(
        True, "Drop split poses that have no caption in `caption_files` (as the PoseScript "
              "loader does).")
    remove_root_yaw: bool = option(
        True, "Remove the root heading (PoseScript normalises the global orientation this "
              "way; captions do not describe the heading).")


@dataclass
class Pw3dSource(DatasetSource):
    """3DPW: in-the-wild video with SMPL ground truth (image -> pose evaluation)."""

    homepage: str = option(
        "https://virtualhumans.mpi-inf.mpg.de/3DPW/", "3DPW: accept the licence at "
        "https://virtualhumans.mpi-inf.mpg.de/3DPW/, download sequenceFiles.zip and "
        "imageFiles.zip and unpack both into `root` (root/sequenceFiles/{train,validation,"
        "test}/*.pkl, root/imageFiles/<sequence>/image_%05d.jpg).")
    manual: bool = option(True, "3DPW is licence-gated (manual download).")
    files: list[str] = option(["sequenceFiles"], "Paths that must exist under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["train"], "val": ["validation"], "test": ["test"]},
        "Our split -> folders under root/sequenceFiles.")


@dataclass
class H36mSource(DatasetSource):
    """Human3.6M in the SPIN-style preprocessed npz layout."""

    homepage: str = option(
        "http://vision.imar.ro/human3.6m/", "Human3.6M: register at "
        "http://vision.imar.ro/human3.6m/, extract the frames and build the SPIN-style npz "
        "files (https://github.com/nkolot/SPIN, datasets/preprocess; SMPL fits from MoSh are "
        "licensed separately) into `root`; images are looked up under `image_root`.")
    manual: bool = option(True, "Human3.6M needs a registration (manual download).")
    files: list[str] = option(["h36m_train.npz", "h36m_valid_protocol2.npz"],
                              "npz files that must exist under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["h36m_train.npz"], "test": ["h36m_valid_protocol2.npz"]},
        "Our split -> SPIN-style npz files under `root` (keys imgname, center, scale, pose, "
        "shape, S, part[, has_smpl]). A file without pose/shape (SPIN's "
        "h36m_valid_protocol2.npz: imgname, center, scale, S) becomes an evaluation split: "
        "images + the 3D joints S, with rest-pose placeholders flagged by /meta/has_smpl = 0.")
    frame_stride: int = option(5, "Keep every k-th row of files with SMPL fits (H36M frames "
                                  "are highly redundant); evaluation files without fits "
                                  "(protocol 2) are kept whole.", minimum=1)


@dataclass
class MpiInf3dhpSource(DatasetSource):
    """MPI-INF-3DHP in the SPIN-style preprocessed npz layout."""

    homepage: str = option(
        "https://vcai.mpi-inf.mpg.de/3dhp-dataset/", "MPI-INF-3DHP: accept the licence at "
        "https://vcai.mpi-inf.mpg.de/3dhp-dataset/, run its download script, extract frames "
        "and build the SPIN-style npz files into `root`.")
    manual: bool = option(True, "MPI-INF-3DHP is licence-gated (manual download).")
    files: list[str] = option(["mpi_inf_3dhp_train.npz"], "npz files that must exist under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["mpi_inf_3dhp_train.npz"]},
        "Our split -> SPIN-style npz files under `root`.")
    frame_stride: int = option(2, "Keep every k-th row.", minimum=1)


_EFT_BASE = "https://dl.fbaipublicfiles.com/eft/eft_fit_ver01/"


@dataclass
class EftSource(DatasetSource):
    """Images with EFT pseudo-ground-truth SMPL fits (one EFT json per image collection).

    The fields shared by every EFT dataset; the dataset-specific defaults (fit file,
    image folder, help texts) are data in ``_EFT_DATASETS`` and become the defaults of
    one subclass per dataset (:func:`_eft_source`), so that a partial override in the
    config keeps the other defaults of that dataset.
    """

    manual: bool = option(False, "EFT fits download without registration.")
    extract: bool = option(False, "EFT files are plain JSON.")
    image_subdir: str = option("", "Folder under `image_root` holding the images named by 'imageName'.")


# dataset name -> (class name, summary, homepage help, EFT fit file, image folder)
_EFT_DATASETS: dict[str, tuple[str, str, str, str, str]] = {
    "coco_eft": (
        "CocoEftSource", "COCO 2014 images with EFT pseudo-ground-truth SMPL fits.",
        "EFT fits are public (downloaded from dl.fbaipublicfiles.com); the COCO 2014 train "
        "images come from https://cocodataset.org (put train2014/ under `image_root`).",
        "COCO2014-All-ver01.json", "train2014"),
    "mpii_eft": (
        "MpiiEftSource", "MPII images with EFT pseudo-ground-truth SMPL fits.",
        "EFT fits are public; the MPII images come from http://human-pose.mpi-inf.mpg.de "
        "(images/ under `image_root`).",
        "MPII_ver01.json", "images"),
}


def _eft_source(name: str) -> type[EftSource]:
    """The section class of EFT dataset ``name``: :class:`EftSource` with its defaults."""
    cls_name, summary, homepage_help, fit_file, subdir = _EFT_DATASETS[name]

    @dataclass
    class _Source(EftSource):
        homepage: str = option("https://github.com/facebookresearch/eft", homepage_help)
        urls: list[str] = option([_EFT_BASE + fit_file], "EFT fit files to download.")
        files: list[str] = option([fit_file], "EFT files expected under `root`.")
        splits: dict[str, list[str]] = option(
            {"train": [fit_file]}, "Our split -> EFT json files under `root`.")
        image_subdir: str = option(subdir, "Folder under `image_root` holding the images "
                                           "named by 'imageName'.")

    _Source.__name__ = _Source.__qualname__ = cls_name
    _Source.__doc__ = summary
    return _Source


CocoEftSource = _eft_source("coco_eft")
MpiiEftSource = _eft_source("mpii_eft")


@dataclass
class BedlamScriptSource(DatasetSource):
    """BEDLAM-Script: BEDLAM renders with SMPL-X labels plus pose captions (image+pose+text)."""

    homepage: str = option(
        "https://bedlam.is.tue.mpg.de", "BEDLAM: register at https://bedlam.is.tue.mpg.de, "
        "download the images and the processed SMPL-X labels (npz per scene: imgname, "
        "pose_cam (N,165), shape (N,>=10), trans_cam, cam_int, cam_ext) into "
        "root/labels/<split>/, and the caption file(s) into root/captions/. Layout assumed by "
        "poserft (no official BEDLAM-Script release layout could be checked): captions/"
        "<split>.json maps '<npz file name>:<row>' to a caption or a list of captions.")
    manual: bool = option(True, "BEDLAM is licence-gated (manual download).")
    files: list[str] = option(["labels", "captions"], "Folders that must exist under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["training"], "val": ["validation"]},
        "Our split -> BEDLAM split names (folder under root/labels and caption file stem).")


@dataclass
class LlavaInstructSource(DatasetSource):
    """LLaVA-Instruct-150K: COCO images with instruction-following conversations (VQA only)."""

    homepage: str = option(
        "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K",
        "LLaVA-Instruct-150K (CC BY 4.0; images: COCO train2017 from https://cocodataset.org, "
        "put train2017/ under `image_root`).")
    manual: bool = option(False, "The json downloads without registration.")
    urls: list[str] = option(
        ["https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/"
         "llava_instruct_150k.json"], "Conversation files to download.")
    extract: bool = option(False, "Plain JSON.")
    files: list[str] = option(["llava_instruct_150k.json"], "Files expected under `root`.")
    splits: dict[str, list[str]] = option(
        {"train": ["llava_instruct_150k.json"]}, "Our split -> conversation json files.")
    image_subdir: str = option("train2017", "Folder under `image_root` holding the COCO images.")
    val_fraction: float = option(
        0.0, "Fraction of conversations (by image, seeded) moved from 'train' into a 'val' "
             "split (0: none).", minimum=0.0, maximum=0.5)


# dataset name -> its section class (the field names of DatasetsConfig below)
_SOURCES: dict[str, type[DatasetSource]] = {
    "amass": AmassSource,
    "posescript": PoseScriptSource,
    "pw3d": Pw3dSource,
    "h36m": H36mSource,
    "mpi_inf_3dhp": MpiInf3dhpSource,
    "coco_eft": CocoEftSource,
    "mpii_eft": MpiiEftSource,
    "bedlam_script": BedlamScriptSource,
    "llava_instruct": LlavaInstructSource,
}
DATASET_NAMES: tuple[str, ...] = tuple(_SOURCES)


@dataclass
class DatasetsConfig(Section):
    """Real datasets: which are used, where they come from, how they are converted."""

    enabled: list[str] = option(
        [], f"Real datasets to download and convert (data/<name>/<split>.h5). Empty (the "
            f"embedded default): the synthetic world only. Known: {list(DATASET_NAMES)}.")
    raw_dir: str = option("raw", "Parent folder of each dataset's default `root` (<raw_dir>/<name>).")
    download_retries: int = option(5, "Attempts per file (transient errors, dropped connections).",
                                   minimum=1, maximum=50)
    download_timeout_s: float = option(60.0, "Socket timeout of one download request.",
                                       exclusive_minimum=0)
    amass: AmassSource = option(AmassSource(), "AMASS (poses only).")
    posescript: PoseScriptSource = option(PoseScriptSource(), "PoseScript captions on AMASS poses.")
    pw3d: Pw3dSource = option(Pw3dSource(), "3DPW.")
    h36m: H36mSource = option(H36mSource(), "Human3.6M (SPIN npz).")
    mpi_inf_3dhp: MpiInf3dhpSource = option(MpiInf3dhpSource(), "MPI-INF-3DHP (SPIN npz).")
    coco_eft: CocoEftSource = option(CocoEftSource(), "COCO 2014 + EFT fits.")
    mpii_eft: MpiiEftSource = option(MpiiEftSource(), "MPII + EFT fits.")
    bedlam_script: BedlamScriptSource = option(BedlamScriptSource(), "BEDLAM-Script.")
    llava_instruct: LlavaInstructSource = option(LlavaInstructSource(), "LLaVA-Instruct-150K (VQA).")

    def check(self, where: str) -> None:
        for i, name in enumerate(self.enabled):
            if name not in _SOURCES:
                raise ConfigError(f"{where}.enabled[{i}]: unknown dataset {name!r}; known: "
                                  f"{list(DATASET_NAMES)}")
        if len(set(self.enabled)) != len(self.enabled):
            raise ConfigError(f"{where}.enabled: a dataset is listed twice")

    def source(self, name: str) -> DatasetSource:
        """The section of dataset ``name``."""
        if name not in _SOURCES:
            raise ConfigError(f"datasets: unknown dataset {name!r}; known: {list(DATASET_NAMES)}")
        return getattr(self, name)

    def root_of(self, name: str) -> str:
        """The raw folder of ``name``: its ``root`` or ``<raw_dir>/<name>``."""
        return self.source(name).root or f"{self.raw_dir.rstrip('/')}/{name}"


assert {f.name for f in fields(DatasetsConfig)} >= set(_SOURCES)


def source_section(name: str, value: DatasetSource | dict | None) -> DatasetSource:
    """Dataset ``name``'s section from an object or its plain dict (``datasets.<name>``)."""
    if name not in _SOURCES:
        raise ConfigError(f"datasets: unknown dataset {name!r}; known: {list(DATASET_NAMES)}")
    cls = _SOURCES[name]
    if isinstance(value, DatasetSource):
        if not isinstance(value, cls):
            raise ConfigError(f"datasets.{name}: expected a {cls.__name__}, got {type(value).__name__}")
        return value
    return cls.from_dict(dict(value or {}), where=f"datasets.{name}")


