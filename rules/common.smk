# Shared paths and helpers. Every rule gets only its own config section(s) as plain-dict
# params, so editing a section reruns that stage and what follows, nothing upstream. The
# params come from CFG (the Snakefile's one parse) in canonical form: every key, defaults
# filled, fixed order; key order or a default written out changes nothing.

SPLITS = ["train", "val", "test"]
RESULTS = "results"
RUNS = f"{RESULTS}/runs"
VARIANTS = list(CFG.variants)
SEEDS = list(CFG.seeds)
REAL_DATASETS = list(CFG["datasets"].enabled)


wildcard_constraints:
    split="train|val|test",
    seed=r"\d+",
    role="reward|evaluator",
    variant="|".join(VARIANTS),


def synthetic_splits():
    return {s: f"data/synthetic/{s}.h5" for s in SPLITS}


def dataset_splits(name):
    return list(CFG["datasets"].source(name).splits)


def sft_owner(variant):
    """The variant whose SFT checkpoint `variant` uses (itself unless `sft_from`)."""
    return CFG.sft_owner(variant)


def has_rft(variant):
    return CFG.has_rft(variant)


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
    return "reward" if CFG["retrieval"].share_evaluator_with_reward else "evaluator"


def retrieval_dir(role):
    return f"{RESULTS}/retrieval/{role}"


def pose_encoder_inputs():
    if CFG["pose_encoder"].enabled:
        return [f"{RESULTS}/pose_encoder/model.safetensors"]
    return []


def tokenizer_corpus():
    """Train splits whose captions and VQA texts train the BPE tokenizer: every source of
    retrieval.data and of each variant's sft.data. None with tokenizer.pretrained."""
    if CFG["tokenizer"].pretrained:
        return {}
    files = dict(CFG.training_files("retrieval", splits=("train",)))
    for v in VARIANTS:
        files.update(CFG.training_files("sft", CFG.sft_owner(v), splits=("train",)))
    return files


def dataset_params(name):
    """Only what dataset `name`'s download/conversion reads, so editing one dataset's
    section reruns that dataset alone."""
    ds = CFG.params("datasets")
    keep = ("raw_dir", "download_retries", "download_timeout_s")
    return {**{k: ds[k] for k in keep}, name: ds[name]}


def posescript_reads_amass():
    """PoseScript's converter reads the AMASS poses its ids name: from
    datasets.posescript.amass_root, else from the amass dataset's root (then, with amass
    enabled, only after download_amass has checked or fetched it)."""
    return "posescript" in REAL_DATASETS and not CFG["datasets"].source("posescript").amass_root


def convert_params(name):
    """What convert_<name> reads: its own section, and for PoseScript also the amass
    section when it takes the AMASS root from there (editing amass reruns it too)."""
    params = dataset_params(name)
    if name == "posescript" and posescript_reads_amass():
        params["amass"] = CFG.params("datasets")["amass"]
    return params


def convert_inputs(name):
    inputs = {"manifest": f"data/{name}/download_manifest.json"}
    if name == "posescript" and posescript_reads_amass() and "amass" in REAL_DATASETS:
        inputs["amass_manifest"] = "data/amass/download_manifest.json"
    return inputs


def metrics_files():
    return [f"{RUNS}/{v}/seed{s}/metrics.json" for v in VARIANTS for s in SEEDS]


def all_targets():
    targets = list(synthetic_splits().values())
    targets += [f"data/{ds}/{split}.h5" for ds in REAL_DATASETS
                for split in dataset_splits(ds)]
    targets += [f"{retrieval_dir(r)}/recall.json" for r in sorted({"reward", evaluator_role()})]
    targets += metrics_files()
    targets += [f"{RESULTS}/tables/main.md", f"{RESULTS}/report/summary.md"]
    return targets


def resolve_experiment():
    """Create/resolve the MLflow experiment once, before parallel jobs race to do it."""
    tracking = CFG["tracking"]
    if not tracking.enabled:
        return
    from poserft.tracking import default_artifact_root, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking.tracking_uri, RESULTS)
    root = default_artifact_root(uri, tracking.artifact_root, RESULTS)
    ensure_experiment(tracking.experiment, uri, root)
