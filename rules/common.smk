# Shared paths and helpers. Every rule gets only its own config section(s) as plain-dict
# params, so editing a section reruns that stage and what follows, nothing upstream.

SPLITS = ["train", "val", "test"]
RESULTS = "results"
RUNS = f"{RESULTS}/runs"
VARIANTS = list(config["variants"])
SEEDS = [int(s) for s in config.get("seeds", [0])]
REAL_DATASETS = list(config["datasets"].get("enabled", []))

from poserft.data.converters.config import dataset_splits


wildcard_constraints:
    split="train|val|test",
    seed=r"\d+",
    role="reward|evaluator",
    variant="|".join(VARIANTS),


def synthetic_splits():
    return {s: f"data/synthetic/{s}.h5" for s in SPLITS}


def sft_owner(variant):
    """The variant whose SFT checkpoint `variant` uses (itself unless `sft_from`)."""
    return config["variants"][variant].get("sft_from") or variant


def has_rft(variant):
    return config["variants"][variant].get("rft") is not None


def rft_variants():
    return [v for v in VARIANTS if has_rft(v)]


def sft_dir(variant, seed):
    """The exported SFT policy `variant` starts from (run_sft writes it to <run>/sft/final)."""
    return f"{RUNS}/{sft_owner(variant)}/seed{seed}/sft/final"


def policy_dir(variant, seed):
    """The checkpoint a variant is evaluated with: RFT output, or SFT for SFT-only variants."""
    if has_rft(variant):
        return f"{RUNS}/{variant}/seed{seed}/rft"
    return sft_dir(variant, seed)


def evaluator_role():
    return "reward" if config["retrieval"].get("share_evaluator_with_reward") else "evaluator"


def retrieval_dir(role):
    return f"{RESULTS}/retrieval/{role}"


def pose_encoder_inputs():
    if config["pose_encoder"].get("enabled"):
        return [f"{RESULTS}/pose_encoder/model.safetensors"]
    return []


def dataset_params(name):
    """Only what dataset `name`'s download/conversion reads, so editing one dataset's
    section reruns that dataset alone."""
    ds = config["datasets"]
    keep = ("raw_dir", "download_retries", "download_timeout_s")
    return {**{k: ds[k] for k in keep if k in ds}, name: ds.get(name, {})}


def metrics_files():
    return [f"{RUNS}/{v}/seed{s}/metrics.json" for v in VARIANTS for s in SEEDS]


def all_targets():
    targets = list(synthetic_splits().values())
    targets += [f"data/{ds}/{split}.h5" for ds in REAL_DATASETS
                for split in dataset_splits(config["datasets"], ds)]
    targets += [f"{retrieval_dir(r)}/recall.json" for r in sorted({"reward", evaluator_role()})]
    targets += metrics_files()
    targets += [f"{RESULTS}/tables/main.md", f"{RESULTS}/report/summary.md"]
    return targets


def resolve_experiment():
    """Create/resolve the MLflow experiment once, before parallel jobs race to do it."""
    if not config["tracking"].get("enabled", True):
        return
    from poserft.tracking import default_artifact_root, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(config["tracking"].get("tracking_uri"), RESULTS)
    root = default_artifact_root(uri, config["tracking"].get("artifact_root"), RESULTS)
    ensure_experiment(config["tracking"]["experiment"], uri, root)
