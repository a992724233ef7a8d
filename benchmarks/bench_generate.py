"""Group generation: shared, KV-cached prompt prefix vs recomputing the prompt per sample.

G samples per prompt (HyGRPO's group). ``PoseMLLM.generate(num_samples=G)`` runs the
vision encoders and the LLM prefill ONCE per prompt and repeats the KV cache G times.
Baselines that recompute the prompt for every sample:

* ``naive``  : G separate calls with one sample each (the prompt, image tokens included,
  is encoded and prefilled G times; decoding runs G times at batch B);
* ``batched``: one call on the prompt list repeated G times (the prompt is still encoded
  and prefilled G times, but in one batch; what ``num_return_sequences`` does in HF).

Prints the median wall time of each and the speed-up ratios. Run::

    .venv/bin/python benchmarks/bench_generate.py [--group 8] [--new-tokens 16] [--threads 1]

Defaults: the embedded model config (64x64 image -> 64 image tokens), random weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timeit(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch (B)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from poserft.model.config import ModelConfig
    from poserft.model.policy import build_policy
    from poserft.model.testing import make_test_tokenizer

    tok = make_test_tokenizer(tempfile.mkdtemp(prefix="bench_tok_"))
    policy = build_policy(ModelConfig(), tok).to(args.device).eval()
    prompts = [policy.image2pose_prompt()] * args.prompts
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.prompts, 64, 64, 3), generator=g, dtype=torch.uint8)
    n_prompt = policy.build_inputs(prompts[:1], images[:1])["input_ids"].shape[1]
    kw = dict(max_new_tokens=args.new_tokens, temperature=1.0, do_sample=True)
    G = args.group

    def shared():
        return policy.generate(prompts, images, num_samples=G, **kw)

    def naive():
        return [policy.generate(prompts, images, num_samples=1, **kw) for _ in range(G)]

    def batched():
        return policy.generate([p for p in prompts for _ in range(G)],
                               images.repeat_interleave(G, 0), num_samples=1, **kw)

    # A random model rarely emits </s> (p ~ 1/vocab per token), so each method decodes
    # about --new-tokens tokens per sample; the counts are printed to check.
    t_shared, r = _timeit(shared, args.repeats)
    t_naive, rn = _timeit(naive, args.repeats)
    t_batched, rb = _timeit(batched, args.repeats)
    tokens = int(r.completion_mask.sum())
    tokens_naive = int(sum(x.completion_mask.sum() for x in rn))
    tokens_batched = int(rb.completion_mask.sum())
    out = {"prompt_tokens": n_prompt, "image_tokens": policy.num_image_tokens, "B": args.prompts,
           "G": G, "new_tokens": args.new_tokens, "generated_tokens": tokens,
           "generated_tokens_naive": tokens_naive, "generated_tokens_batched": tokens_batched,
           "shared_s": t_shared, "naive_s": t_naive, "batched_s": t_batched,
           "ratio_naive": t_naive / t_shared, "ratio_batched": t_batched / t_shared}
    print(f"prompt: {n_prompt} tokens ({policy.num_image_tokens} image tokens); B={args.prompts} "
          f"prompts x G={G} samples x {args.new_tokens} new tokens; device {args.device}, "
          f"{args.threads} thread(s); median of {args.repeats}")
    print(f"  shared cached prefix   : {t_shared * 1000:8.1f} ms   ({tokens} tokens generated)")
    print(f"  naive (prompt per call): {t_naive * 1000:8.1f} ms   ({tokens_naive} tokens)  "
          f"ratio {out['ratio_naive']:.2f}x")
    print(f"  batched (prompt x G)   : {t_batched * 1000:8.1f} ms   ({tokens_batched} tokens)  "
          f"ratio {out['ratio_batched']:.2f}x")
    return out


if __name__ == "__main__":
    main()
