"""The ``rft`` config section: HyGRPO reinforcement fine-tuning (stdlib only).

Defaults are the tiny embedded world (a few prompts, a few steps, CPU, about a minute).
Paper-scale values (Pose-RFT: lr 1e-6, batch 16 prompts, 1k steps) go in configs/paper.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from poserft.configbase import ConfigError, Section, option
from poserft.data.config import LoaderConfig, check_data_weights, data_option
from poserft.model.config import DEFAULT_FORMAT_REGEX
from poserft.train.config import SFT_TASKS, EngineConfig, OptimConfig

__all__ = ["RFTConfig", "RewardDecl", "REWARD_DECLS", "HELDOUT_REWARDS", "RFT_MODES",
           "TOKEN_KL_ESTIMATOR_NAMES", "POSE_KL_ESTIMATOR_NAMES", "LOSS_AGG_MODE_NAMES",
           "POSE_LOSS_AGG_MODE_NAMES", "ADVANTAGE_ESTIMATOR_NAMES", "TASKS", "DEFAULT_FORMAT_REGEX"]

TASKS = SFT_TASKS  # text2pose, image2pose, image2text (VQA); shared with SFT

# Names the config selects from; poserft.rl.core registers one function under each (a test
# checks the two agree). Kept here, stdlib-only, so the Snakefile validates them at parse time.
RFT_MODES = ("hygrpo", "grpo", "continuous")
TOKEN_KL_ESTIMATOR_NAMES = ("k1", "k2", "k3")
POSE_KL_ESTIMATOR_NAMES = ("analytic", "k3")
LOSS_AGG_MODE_NAMES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum",
                       "seq-mean-token-sum-norm")
POSE_LOSS_AGG_MODE_NAMES = ("candidate-mean", "group-mean-candidate-mean")
ADVANTAGE_ESTIMATOR_NAMES = ("grpo", "rloo")


@dataclass(frozen=True)
class RewardDecl:
    """What a reward is, for the config and the trainer: its branch, the tasks it scores by
    default, the frozen model it needs (a :class:`poserft.rl.rewards.RewardContext` field;
    built only when the reward is active on a sampled task), and the task whose held-out
    before/after measurement it is (``rft_summary.json``). Its function is registered under
    the same name in :data:`poserft.rl.rewards.REWARDS`."""
    branch: str                      # "discrete" (text level) | "continuous" (pose level)
    tasks: tuple[str, ...]
    needs: str | None = None         # body_model | semantic_model | text_embedder
    heldout_task: str | None = None


# Adding a reward: declare it here, register its function in poserft/rl/rewards.py.
REWARD_DECLS: dict[str, RewardDecl] = {
    "format": RewardDecl("discrete", ("image2pose", "text2pose")),
    "text": RewardDecl("discrete", ("image2text",), needs="text_embedder"),
    "joint": RewardDecl("continuous", ("image2pose",), needs="body_model", heldout_task="image2pose"),
    "semantic": RewardDecl("continuous", ("text2pose",), needs="semantic_model",
                           heldout_task="text2pose"),
}
# held-out measurement: pose task -> the reward it is judged by
HELDOUT_REWARDS = {d.heldout_task: name for name, d in REWARD_DECLS.items() if d.heldout_task}


@dataclass
class RFTConfig(Section):
    """HyGRPO reinforcement fine-tuning from the SFT policy (pose MLLM)."""

    mode: str = option(
        "hygrpo", "hygrpo: discrete token term + continuous Gaussian pose term (the method); "
        "grpo: discrete-only GRPO, the pose is the head's mean and gets no policy-gradient "
        "term (ablation); continuous: only the pose term (debugging).", choices=RFT_MODES)
    steps: int = option(200, "RL steps (each: rollout of batch_size prompts x group_size "
                        "candidates, then mu update iterations). Paper: 1000.", minimum=0)
    batch_size: int = option(
        4, "Prompts per RL step in total over all ranks (the global batch; paper: 16). Each "
        "rank (GPU) samples its disjoint share batch_size / ranks of the step's draw, so the "
        "batch does not grow with the number of GPUs; it must be a multiple of the number "
        "of ranks (checked at setup). Advantages are computed within each prompt's group of "
        "group_size candidates, on the rank that sampled it.", minimum=1)
    group_size: int = option(32, "Candidates G sampled per prompt (the group of GRPO). The "
                             "continuous branch estimates a gradient in the 144-D pose space "
                             "from these G samples: on the embedded world G=16 let the head's "
                             "mean pose drift (held-out mean-pose joint reward fell), G=32 "
                             "improved all four held-out rewards (docs/rft.md).", minimum=2)
    micro_batch_size: int = option(
        64, "Candidates per forward/backward pass on one rank during the update (gradient "
        "accumulation over the rank's rollout; one optimizer step per update iteration). "
        "Must divide the per-rank rollout (batch_size / ranks) * group_size: checked here "
        "for one rank (batch_size * group_size) and at setup for the actual number of "
        "ranks.", minimum=1)
    rollout_chunk_size: int = option(
        0, "Prompts per generate call within a rank's rollout (0 = all of the rank's prompts "
        "at once). Each call repeats the prompts' KV cache group_size times, so the "
        "rollout's peak memory grows with chunk x group_size; lower it when the rollout runs "
        "out of memory. Any value samples from the same distribution: a chunk at least the "
        "rank's prompt count gives the identical rollout (one call); smaller chunks consume "
        "the step's seeded generator chunk after chunk, so the draws (not their "
        "distribution) differ. The held-out measurement uses min(16, this) prompts per call "
        "when set.", minimum=0)
    mu: int = option(2, "Update iterations (optimizer steps) per rollout batch; > 1 makes "
                     "the update off-policy so the clip matters.", minimum=1)
    clip_eps_token: float = option(0.2, "PPO clip range of the token ratio (lower side, and "
                                   "upper unless clip_eps_token_high is set).",
                                   exclusive_minimum=0.0, maximum=1.0)
    clip_eps_token_high: float | None = option(
        None, "Upper clip range of the token ratio (DAPO clip-higher); null = clip_eps_token.")
    clip_eps_pose: float = option(0.2, "PPO clip range of the Gaussian pose ratio r_c.",
                                  exclusive_minimum=0.0, maximum=1.0)
    dual_clip_c: float | None = option(
        3.0, "Dual clip (Ye et al. 2020; verl's clip_ratio_c) on both branches: for a negative "
        "advantage A the clipped PPO loss is also capped at -A * c, so a ratio far above 1 "
        "cannot give an unbounded loss. Must be > 1; null disables it.")
    beta_token: float = option(0.04, "Coefficient of the token KL to the frozen reference "
                               "(SFT) policy; 0 disables the reference forward.", minimum=0.0)
    beta_pose: float = option(0.01, "Coefficient of the pose KL (summed over the 144 dims) to "
                              "the reference policy.", minimum=0.0)
    learn_pose_std: bool = option(
        True, "true: the PPO and KL terms of the continuous branch move the head's mean and "
              "its std (and low-rank factor). false: only the mean; the std is held at what "
              "the policy gives (no gradient through it), so the samples keep exploring "
              "instead of the std shrinking, which raises the sampled reward most cheaply.")
    token_kl_estimator: str = option(
        "k3", "Per-token KL estimator (Schulman): k1 = log ratio, k2 = squared/2, k3 = "
        "unbiased and non-negative (GRPO).", choices=TOKEN_KL_ESTIMATOR_NAMES)
    pose_kl_estimator: str = option(
        "analytic", "Pose KL: closed form between the two Gaussians, or k3 on the sampled pose.",
        choices=POSE_KL_ESTIMATOR_NAMES)
    loss_agg_mode: str = option(
        "seq-mean-token-mean", "Token aggregation of the discrete term: per-sequence mean "
        "then mean over the G candidates (GRPO), all-token mean, per-sequence sum, or sum / "
        "(N * T) (Dr. GRPO).", choices=LOSS_AGG_MODE_NAMES)
    pose_loss_agg_mode: str = option(
        "candidate-mean", "Aggregation of the continuous term over candidates: mean over the V "
        "valid candidates (those with a <POSE>) of the whole batch, or mean over the V_g valid "
        "candidates of each prompt group then over the prompt groups (eq. (6) of Pose-RFT read "
        "per prompt; a group with no valid candidate contributes 0).",
        choices=POSE_LOSS_AGG_MODE_NAMES)
    advantage_estimator: str = option(
        "grpo", "Group baseline: grpo (group mean) or rloo (leave-one-out mean).",
        choices=ADVANTAGE_ESTIMATOR_NAMES)
    norm_adv_by_std: bool = option(True, "Divide group-centred rewards by the group std "
                                   "(GRPO); false = Dr. GRPO centring only.")
    adv_eps: float = option(1e-6, "Added to the group std before dividing.", exclusive_minimum=0.0)
    reward_weights: dict[str, float] = option(
        {name: 1.0 for name in REWARD_DECLS},
        f"Weight of each reward in its branch's sum (known: {', '.join(REWARD_DECLS)}). "
        "A weight of 0 (or leaving a reward out) disables it. Replaces the whole mapping.")
    discrete_rewards: list[str] = option(
        [n for n, d in REWARD_DECLS.items() if d.branch == "discrete"],
        "Rewards summed into the discrete reward R_d (text level).")
    continuous_rewards: list[str] = option(
        [n for n, d in REWARD_DECLS.items() if d.branch == "continuous"],
        "Rewards summed into the continuous reward R_c (pose level).")
    reward_tasks: dict[str, list[str]] = option(
        {n: list(d.tasks) for n, d in REWARD_DECLS.items()},
        "Tasks each reward applies to (image2pose, text2pose, image2text); elsewhere it is "
        "undefined and left out of the sum.")
    grpo_pose_rewards_to_text: bool = option(
        True, "In mode grpo, add the continuous rewards (of the head's mean pose; 0 when no "
        "pose was emitted) to the discrete reward, so discrete-only GRPO optimises the same "
        "objective through the tokens.")
    format_regex: str = option(
        DEFAULT_FORMAT_REGEX, "Python regex the whole stripped answer must match for the "
        "format reward (1 if it matches, else 0). Default: the pose answer with tolerant "
        "whitespace.")
    joint_reward_eps_m: float = option(
        0.001, "joint reward = min(1 / (MPJPE_m + eps), cap) with MPJPE in metres "
        "(pelvis-aligned, 24 SMPL joints of the body model); eps in metres.",
        exclusive_minimum=0.0)
    joint_reward_cap: float = option(100.0, "Upper bound of the joint reward (1/m), so a "
                                     "perfect pose gives a finite value.", exclusive_minimum=0.0)
    temperature: float = option(1.0, "Sampling temperature of the rollout.", exclusive_minimum=0.0)
    max_new_tokens: int = option(24, "Longest generated answer (tokens).", minimum=1)
    data: dict[str, float] = data_option("rft", "RL prompts and their ground truth")
    loader: LoaderConfig = option(LoaderConfig(), "Reading prompts: images stored as file "
                                  "paths (crop, resize, bad files); num_workers is unused here "
                                  "(a step reads only batch_size prompts).")
    task_weights: dict[str, float] = option(
        {"image2pose": 0.5, "text2pose": 0.5, "image2text": 0.0},
        "Sampling weight of each task when drawing RL prompts (normalised; tasks whose data "
        "the split lacks are an error). Same idea as sft.task_weights.")
    eval_prompts: int = option(128, "Held-out (val) prompts per pose task for the before/after "
                               "reward measurement in rft_summary.json (0 = skip).", minimum=0)
    eval_samples: int = option(16, "Sampled candidates per held-out prompt in that measurement "
                               "(rewards averaged over them; the sampled-pose semantic reward "
                               "is noisy, 4 samples left its paired SE at ~0.02).", minimum=1)
    reference_device: str = option(
        "auto", "Where the frozen reference policy (pi_ref of the KL terms) lives. auto: "
        "each rank's own training device (the engine's, cuda:LOCAL_RANK on GPUs), in the "
        "policy's training dtype. A device name (cpu, cuda:1) puts the frozen copy there "
        "(cpu saves GPU memory at the cost of slow reference forwards). A policy with LoRA "
        "adapters needs no copy: the reference is the policy itself with its adapters "
        "disabled, and this key is ignored.")
    optim: OptimConfig = option(
        OptimConfig(lr=5e-5, warmup_steps=0, min_lr_ratio=1.0, betas=[0.9, 0.95]),
        "Optimizer (AdamW) and LR schedule, counted in optimizer steps (steps * mu). Paper: "
        "lr 1e-6 on LLaVA-7B. Embedded world (docs/embedded_world.md): from the current SFT, "
        "2e-4 and 1e-4 moved the held-out mean-pose joint reward down (t -5.5, -1.5), 5e-5 "
        "kept it (t +0.1) with the semantic reward up (t 7.6). min_lr_ratio 1 keeps the LR "
        "constant.")
    engine: EngineConfig = option(
        EngineConfig(checkpoint_every=10, log_every=1),
        "Training engine (shared with SFT). Here checkpoint_every and log_every count RL "
        "steps (0: checkpoint only at the end); a killed rft job resumes from its newest "
        "checkpoint. seed seeds prompts and sampling.")

    def check(self, where: str) -> None:
        check_data_weights(f"{where}.data", self.data)
        n = self.batch_size * self.group_size
        if n % self.micro_batch_size:
            raise ConfigError(
                f"{where}.micro_batch_size ({self.micro_batch_size}) must divide "
                f"{where}.batch_size * {where}.group_size = {self.batch_size} * "
                f"{self.group_size} = {n}; change one of them")
        if self.reference_device != "auto":
            import re
            if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.reference_device):
                raise ConfigError(f"{where}.reference_device: {self.reference_device!r} is not "
                                  "a device; use auto (the rank's training device), cpu, cuda "
                                  "or cuda:N")
        if self.clip_eps_token_high is not None and self.clip_eps_token_high <= 0:
            raise ConfigError(f"{where}.clip_eps_token_high must be > 0 or null")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ConfigError(f"{where}.dual_clip_c must be > 1 (got {self.dual_clip_c}); "
                              "use null to disable the dual clip")
        for key in ("reward_weights", "reward_tasks"):
            unknown = sorted(set(getattr(self, key)) - set(REWARD_DECLS))
            if unknown:
                raise ConfigError(f"{where}.{key}: unknown reward {unknown[0]!r}; known: "
                                  f"{sorted(REWARD_DECLS)}")
        for key, kind in (("discrete_rewards", "discrete"), ("continuous_rewards", "continuous")):
            for name in getattr(self, key):
                if name not in REWARD_DECLS:
                    raise ConfigError(f"{where}.{key}: unknown reward {name!r}; known: "
                                      f"{sorted(REWARD_DECLS)}")
                branch = REWARD_DECLS[name].branch
                if branch != kind:
                    level = "pose-level" if branch == "continuous" else "text-level"
                    raise ConfigError(f"{where}.{key}: {name!r} is a {level} ({branch}) reward; "
                                      f"move it to {where}.{branch}_rewards")
                if name not in self.reward_tasks:
                    raise ConfigError(f"{where}.reward_tasks: missing an entry for {name!r} "
                                      f"(listed in {where}.{key})")
        both = set(self.discrete_rewards) & set(self.continuous_rewards)
        if both:
            raise ConfigError(f"{where}.discrete_rewards and {where}.continuous_rewards both "
                              f"list {sorted(both)}")
        for name, tasks in self.reward_tasks.items():
            for t in tasks:
                if t not in TASKS:
                    raise ConfigError(f"{where}.reward_tasks.{name}: unknown task {t!r}; known: "
                                      f"{list(TASKS)}")
        for t, w in self.task_weights.items():
            if t not in TASKS:
                raise ConfigError(f"{where}.task_weights: unknown task {t!r}; known: {list(TASKS)}")
            if w < 0:
                raise ConfigError(f"{where}.task_weights.{t}: weight {w} must be >= 0")
        if not any(w > 0 for w in self.task_weights.values()):
            raise ConfigError(f"{where}.task_weights: at least one task needs a positive weight")
        active = self.active_rewards()
        for t, w in self.task_weights.items():
            if w > 0 and not any(t in self.reward_tasks.get(n, []) for n in active):
                raise ConfigError(
                    f"{where}.task_weights.{t} > 0 but no active reward applies to {t} (see "
                    f"{where}.reward_tasks / reward_weights); its prompts would teach nothing")
        if self.mode == "continuous" and not any(
                self.reward_weights.get(n, 0.0) for n in self.continuous_rewards):
            raise ConfigError(f"{where}.mode is 'continuous' but {where}.continuous_rewards has "
                              "no reward with a nonzero weight")
        import re
        try:
            re.compile(self.format_regex)
        except re.error as exc:
            raise ConfigError(f"{where}.format_regex: not a valid regular expression ({exc})") from None

    # ------------------------------------------------------------------ derived
    def prompts_per_rank(self, world_size: int, where: str = "rft") -> int:
        """The share of ``batch_size`` (the global prompts per RL step) that each of
        ``world_size`` ranks samples; raises :class:`ConfigError` (naming the keys, the
        world size and the fix) when the batch does not split evenly, or when
        ``micro_batch_size`` does not divide a rank's rollout of that share x group_size."""
        world_size = int(world_size)
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_size % world_size:
            lower = (self.batch_size // world_size) * world_size
            fix = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
            raise ConfigError(
                f"{where}.batch_size={self.batch_size} is the global number of prompts per RL "
                f"step, split evenly over the {world_size} ranks (GPUs) of this run, but "
                f"{self.batch_size} is not a multiple of {world_size}; set {where}.batch_size "
                f"to a multiple of {world_size} (e.g. {fix}) or run on a number of ranks that "
                f"divides {self.batch_size}")
        per_rank = self.batch_size // world_size
        rows = per_rank * self.group_size
        if rows % self.micro_batch_size:
            raise ConfigError(
                f"{where}.micro_batch_size ({self.micro_batch_size}) must divide each rank's "
                f"rollout: {where}.batch_size / ranks * {where}.group_size = "
                f"{self.batch_size} / {world_size} * {self.group_size} = {rows} candidates "
                f"with {world_size} ranks; set {where}.micro_batch_size to a divisor of {rows}")
        return per_rank

    @property
    def uses_tokens(self) -> bool:
        """The discrete (token) term is optimised."""
        return self.mode in ("hygrpo", "grpo")

    @property
    def uses_pose(self) -> bool:
        """The continuous (Gaussian pose) term is optimised."""
        return self.mode in ("hygrpo", "continuous")

    @property
    def sampled_tasks(self) -> dict[str, float]:
        """Tasks RL draws prompts from, with their (positive) weights."""
        return {t: w for t, w in self.task_weights.items() if w > 0}

    def active_rewards(self) -> list[str]:
        """Rewards in a branch with a nonzero weight, branch order."""
        return [n for n in self.discrete_rewards + self.continuous_rewards
                if self.reward_weights.get(n, 0.0) != 0.0]

    def needed_models(self, heldout_tasks: tuple[str, ...] = ()) -> set[str]:
        """The frozen models (:class:`RewardDecl` ``needs``) of the rewards that will run:
        active on a sampled task, or judging a held-out task in ``heldout_tasks``."""
        tasks = set(self.sampled_tasks)
        out = {REWARD_DECLS[n].needs for n in self.active_rewards()
               if tasks & set(self.reward_tasks.get(n, ()))}
        out |= {REWARD_DECLS[HELDOUT_REWARDS[t]].needs for t in heldout_tasks if t in HELDOUT_REWARDS}
        return {n for n in out if n}
