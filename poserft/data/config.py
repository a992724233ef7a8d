"""The ``synth`` config section: the synthetic embedded world (poses, captions, images, VQA).

Stdlib-only (imported by the Snakefile at parse time). Real-dataset settings live in
``poserft/data/converters/config.py`` (``datasets`` section).

Paper-scale values (configs/paper.yaml) would be e.g. ``num_train: 100000``,
``num_val: 5000``, ``num_test: 5000``, ``captions_per_pose: 3``, ``image_size: 224``.
"""

from __future__ import annotations

from dataclasses import dataclass

from poserft.configbase import ConfigError, Section, option

__all__ = ["SynthConfig"]


@dataclass
class SynthConfig(Section):
    """Synthetic embedded world: sampled poses, automatic captions, rendered images, VQA."""

    seed: int = option(0, "Seed of the whole world; each split draws from its own stream, so "
                          "changing one split's size leaves the others unchanged.")
    num_train: int = option(2000, "Number of poses in the train split.", minimum=1)
    num_val: int = option(200, "Number of poses in the val split.", minimum=1)
    num_test: int = option(200, "Number of poses in the test split.", minimum=1)
    archetypes: list[str] = option(
        [], "Posture archetypes to sample from (names in "
            "poserft.data.synthetic.sampler.POSTURES); empty list: all of them.")
    joint_noise_deg: float = option(
        7.0, "Std (degrees) of the Gaussian perturbation added to every joint's rotation on "
             "top of the archetype's own ranges; results are clipped to joint limits.",
        minimum=0.0, maximum=45.0)
    max_yaw_deg: float = option(180.0, "Global yaw (about the vertical y axis) is uniform in "
                                       "[-max_yaw_deg, max_yaw_deg].",
                                minimum=0.0, maximum=180.0)
    captions_per_pose: int = option(3, "Captions generated per pose.", minimum=1)
    min_codes_per_caption: int = option(
        4, "Fewest posecodes (elementary descriptions) verbalised in one caption.", minimum=1)
    max_codes_per_caption: int = option(
        8, "Most posecodes verbalised in one caption.", minimum=1)
    vqa_per_pose: int = option(2, "Question/answer pairs generated per pose (0: no VQA).",
                               minimum=0)
    render_images: bool = option(True, "Render an RGB image of every pose (with camera, "
                                       "2D keypoints, camera-frame root orientation).")
    image_size: int = option(64, "Side of the square rendered images, pixels.",
                             minimum=16, maximum=1024)
    focal_scale: float = option(
        1.4, "Focal length in units of image_size (1.4 ~ 39 degree field of view).",
        exclusive_minimum=0.0)
    focal_jitter: float = option(0.05, "Relative uniform jitter of the focal length.",
                                 minimum=0.0, maximum=0.5)
    elevation_min_deg: float = option(-10.0, "Lowest camera elevation above the body centre.",
                                      minimum=-60.0, maximum=60.0)
    elevation_max_deg: float = option(35.0, "Highest camera elevation above the body centre.",
                                      minimum=-60.0, maximum=60.0)
    fill_min: float = option(
        0.75, "Smallest fraction of the image height covered by the body's bounding sphere "
              "(sets the random camera distance).", exclusive_minimum=0.0, maximum=1.0)
    fill_max: float = option(0.95, "Largest such fraction.", exclusive_minimum=0.0, maximum=1.0)
    background_noise: float = option(0.03, "Std of the per-pixel background noise "
                                           "(intensity in [0, 1]).", minimum=0.0, maximum=0.5)
    compression: str = option("gzip", "HDF5 compression filter.", choices=("gzip", "lzf"))

    def check(self, where: str) -> None:
        if self.min_codes_per_caption > self.max_codes_per_caption:
            raise ConfigError(
                f"{where}.min_codes_per_caption ({self.min_codes_per_caption}) exceeds "
                f"{where}.max_codes_per_caption ({self.max_codes_per_caption}); lower the "
                "first or raise the second.")
        if self.elevation_min_deg > self.elevation_max_deg:
            raise ConfigError(
                f"{where}.elevation_min_deg ({self.elevation_min_deg}) exceeds "
                f"{where}.elevation_max_deg ({self.elevation_max_deg}).")
        if self.fill_min > self.fill_max:
            raise ConfigError(f"{where}.fill_min ({self.fill_min}) exceeds "
                              f"{where}.fill_max ({self.fill_max}).")
        if len(set(self.archetypes)) != len(self.archetypes):
            raise ConfigError(f"{where}.archetypes: duplicate names in {self.archetypes}.")


# ------------------------------------------------------------------ training data as config
SYNTHETIC = "synthetic"          # the embedded world: data/synthetic/{split}.h5


def data_option(stage: str, what: str):
    """The ``data`` key of a training section: which sources feed ``stage``, with weights."""
    return option(
        {SYNTHETIC: 1.0},
        f"Sources of {what} and their weights: dataset name -> weight. A name is "
        f"'{SYNTHETIC}' (the embedded world) or an entry of datasets.enabled with a 'train' "
        "split; the rule reads exactly these data/<name>/train.h5 files (and each one's "
        "val.h5 where the dataset has that split), so editing this reruns "
        f"{stage} and what follows. Each example's task is drawn first (task_weights), then "
        "its source among those that provide the task, in proportion to these weights; a "
        "source is read row by row, never loaded whole.")


def check_data_weights(where: str, data: dict) -> None:
    """Section-level check of a ``data`` mapping (names are checked against the enabled
    datasets by :func:`poserft.config.load_config`, which sees both sections)."""
    if not data:
        raise ConfigError(f"{where}: no source; name at least one, e.g. {{{SYNTHETIC}: 1.0}}")
    for name, weight in data.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ConfigError(f"{where}.{name}: weight {weight!r} must be a number > 0 "
                              "(remove the entry to drop the source)")


@dataclass
class LoaderConfig(Section):
    """How a training stage reads its examples: workers, and images stored as file paths."""

    num_workers: int = option(
        0, "torch DataLoader worker processes that decode, crop and resize the images of a "
           "batch ahead of the step (0: in the training process; the embedded world's "
           "in-file images need none).", minimum=0)
    prefetch_batches: int = option(2, "Batches each worker prepares ahead.", minimum=1)
    image_size: int = option(
        336, "Side of the person crop made from an /image_paths file (pixels) when no "
             "image_processor is set. In-file /images (the synthetic world) are used as "
             "stored; the model resizes to each encoder's input.", minimum=16)
    image_processor: str | None = option(
        None, "Hugging Face image processor (checkpoint name or local folder, e.g. the "
              "backbone's llava-hf/llava-1.5-7b-hf) whose own resize + centre crop turns each "
              "person crop into the vision tower's input. null: bilinear resize to image_size.")
    on_bad_image: str = option(
        "fail", "A missing or unreadable image file: 'fail' stops with an error naming the "
                "split file, the row and the image; 'skip' drops that example (another one "
                "is drawn in its place) and counts it in the logs and MLflow.",
        choices=("fail", "skip"))
