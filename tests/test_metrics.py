"""Metrics against independent references: numpy formulas, scipy Procrustes, brute-force
retrieval loops and the exact hypergeometric expectation of the sampled protocol."""

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation
from scipy.stats import hypergeom

from poserft.eval.metrics import mpjpe, pa_mpjpe, retrieval_recall, \
    sample_retrieval_candidates, similarity_procrustes


def _joints(batch=6, num_joints=14, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.normal(scale=0.3, size=(batch, num_joints, 3))
    pred = gt + rng.normal(scale=0.03, size=gt.shape)
    return pred, gt


# -------------------------------------------------------------------------------- MPJPE --
def test_mpjpe_matches_numpy_formula():
    pred, gt = _joints()
    expected = np.linalg.norm((pred - pred[:, :1]) - (gt - gt[:, :1]), axis=-1).mean(-1) * 1000
    got = mpjpe(pred, gt)
    assert isinstance(got, np.ndarray) and got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(mpjpe(pred, gt, root=None),
                               np.linalg.norm(pred - gt, axis=-1).mean(-1) * 1000, rtol=1e-12)
    hips = (pred[:, 2:4].mean(1, keepdims=True), gt[:, 2:4].mean(1, keepdims=True))
    np.testing.assert_allclose(mpjpe(pred, gt, root=(2, 3)),
                               np.linalg.norm((pred - hips[0]) - (gt - hips[1]), axis=-1)
                               .mean(-1) * 1000, rtol=1e-12)
    # A constant offset is removed by root alignment, not without it.
    shifted = pred + np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(mpjpe(shifted, gt), expected, rtol=1e-10)
    assert (mpjpe(shifted, gt, root=None) > 100).all()


def test_mpjpe_torch_types():
    pred, gt = _joints()
    got = mpjpe(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), mpjpe(pred, gt), rtol=1e-5)


# ----------------------------------------------------------------------------- PA-MPJPE --
def _pa_reference(pred, gt):
    """scipy: orthogonal Procrustes on centred points, scale as in Umeyama."""
    out = []
    for p, g in zip(pred, gt):
        pc, gc = p - p.mean(0), g - g.mean(0)
        rot, sing_sum = orthogonal_procrustes(pc, gc)
        scale = sing_sum / np.sum(pc ** 2)
        aligned = scale * pc @ rot + g.mean(0)
        out.append(np.linalg.norm(aligned - g, axis=-1).mean() * 1000)
    return np.array(out)


def test_pa_mpjpe_matches_scipy_orthogonal_procrustes():
    rng = np.random.default_rng(1)
    pred, gt = _joints(batch=20, seed=1)
    rots = Rotation.random(20, random_state=2).as_matrix()
    scale = rng.uniform(0.5, 2.0, size=(20, 1, 1))
    moved = scale * pred @ rots + rng.normal(size=(20, 1, 3))
    got = pa_mpjpe(moved, gt)
    np.testing.assert_allclose(got, _pa_reference(moved, gt), rtol=1e-9)
    np.testing.assert_allclose(got, _pa_reference(pred, gt), rtol=1e-9)   # invariance
    assert (got > 1.0).all() and (got < mpjpe(moved, gt)).all()


def test_pa_mpjpe_is_zero_for_similar_poses_and_recovers_the_transform():
    _, gt = _joints(batch=4, seed=3)
    rot = torch.tensor(Rotation.random(4, random_state=4).as_matrix())
    gt_t = torch.tensor(gt)
    pred = 1.7 * gt_t @ rot + torch.tensor([0.5, -1.0, 2.0])
    np.testing.assert_allclose(pa_mpjpe(pred, gt_t).numpy(), 0.0, atol=1e-9)
    aligned, scale, r, t = similarity_procrustes(pred, gt_t)
    np.testing.assert_allclose(scale.numpy(), 1 / 1.7, rtol=1e-10)
    np.testing.assert_allclose(r.numpy(), rot.transpose(1, 2).numpy(), atol=1e-10)
    mapped = scale[:, None, None] * pred @ r + t[:, None]
    np.testing.assert_allclose(mapped.numpy(), gt, atol=1e-10)


def test_pa_mpjpe_never_reflects():
    _, gt = _joints(batch=5, seed=5)
    mirrored = gt * np.array([-1.0, 1.0, 1.0])
    # scipy's orthogonal_procrustes may use a reflection (error ~0); we must not.
    assert (_pa_reference(mirrored, gt) < 1e-6).all()
    got = pa_mpjpe(mirrored, gt)
    assert (got > 10).all()
    # Reference restricted to proper rotations: scipy's Kabsch (Rotation.align_vectors).
    expected = []
    for p, g in zip(mirrored, gt):
        pc, gc = p - p.mean(0), g - g.mean(0)
        rot, _ = Rotation.align_vectors(gc, pc)
        rotated = rot.apply(pc)
        scale = np.sum(rotated * gc) / np.sum(pc ** 2)
        expected.append(np.linalg.norm(scale * rotated - gc, axis=-1).mean() * 1000)
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    _, _, rot, _ = similarity_procrustes(torch.tensor(mirrored), torch.tensor(gt))
    np.testing.assert_allclose(torch.linalg.det(rot).numpy(), 1.0, atol=1e-10)


@pytest.mark.parametrize("metric", [mpjpe, pa_mpjpe])
def test_degenerate_joint_inputs_raise(metric):
    pred, gt = _joints()
    bad = pred.copy()
    bad[2, 5, 1] = np.inf
    with pytest.raises(ValueError, match=r"pred contains NaN or inf joints \(first bad samples: \[2"):
        metric(bad, gt)
    bad[2, 5, 1] = np.nan
    with pytest.raises(ValueError, match="gt contains NaN"):
        metric(gt, bad)
    with pytest.raises(ValueError, match="empty input"):
        metric(pred[:0], gt[:0])
    with pytest.raises(ValueError, match="shapes differ"):
        metric(pred[:, :13], gt)
    with pytest.raises(ValueError, match=r"shape \(B, J, 3\)"):
        metric(pred[0], gt[0])
    with pytest.raises(TypeError, match="numpy array"):
        metric("pred", gt)


def test_root_index_checked():
    pred, gt = _joints()
    with pytest.raises(ValueError, match="root=14 is not a valid joint index"):
        mpjpe(pred, gt, root=14)


def test_coincident_prediction_does_not_produce_nan():
    _, gt = _joints(batch=2)
    pred = np.zeros_like(gt)
    got = pa_mpjpe(pred, gt)
    expected = np.linalg.norm(gt - gt.mean(1, keepdims=True), axis=-1).mean(-1) * 1000
    np.testing.assert_allclose(got, expected, rtol=1e-10)


# ---------------------------------------------------------------------------- retrieval --
def _retrieval_data(num_poses=60, captions_per_pose=(0, 1, 2, 3), dim=8, noise=1.0, seed=0,
                    hub=0.0):
    """Random embeddings; with ``hub`` > 0 the first half of the poses (and all captions)
    lean towards one direction, so those poses are hard negatives for every query and a
    sampler that favours some indices would shift the recall."""
    rng = np.random.default_rng(seed)
    pose = rng.normal(size=(num_poses, dim))
    direction = np.eye(dim)[0] * hub
    pose[: num_poses // 2] += direction
    counts = rng.choice(captions_per_pose, size=num_poses)
    c2p = np.repeat(np.arange(num_poses), counts)
    rng.shuffle(c2p)
    text = pose[c2p] + noise * rng.normal(size=(len(c2p), dim)) + direction
    return text, pose, c2p


def _cosine(text, pose):
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    p = pose / np.linalg.norm(pose, axis=1, keepdims=True)
    return t @ p.T


def _full_bruteforce(text, pose, c2p, ks):
    s = _cosine(text, pose)
    out = {}
    for k in ks:
        hits = []
        for m in range(len(c2p)):
            order = sorted(range(len(pose)), key=lambda n: -s[m, n])
            # Ties against the query: count poses scoring >= the ground truth (none here).
            hits.append(order.index(c2p[m]) < k)
        out[f"t2p_R@{k}"] = 100 * np.mean(hits)
    for k in ks:
        hits = []
        for n in sorted(set(c2p.tolist())):
            order = sorted(range(len(c2p)), key=lambda m: -s[m, n])
            hits.append(any(c2p[m] == n for m in order[:k]))
        out[f"p2t_R@{k}"] = 100 * np.mean(hits)
    out["mRecall"] = np.mean(list(out.values()))
    return out


def test_full_protocol_matches_bruteforce():
    text, pose, c2p = _retrieval_data()
    ks = (1, 5, 10, 20)
    got = retrieval_recall(text, pose, c2p, ks=ks, protocol="full")
    expected = _full_bruteforce(text, pose, c2p, ks)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    assert 0 < got["t2p_R@5"] < got["t2p_R@20"] < 100
    default = retrieval_recall(torch.tensor(text), torch.tensor(pose), torch.tensor(c2p))
    assert sorted(default) == sorted(["t2p_R@5", "t2p_R@10", "t2p_R@20", "p2t_R@5", "p2t_R@10",
                                      "p2t_R@20", "mRecall"])
    assert default["mRecall"] == pytest.approx(np.mean([v for k, v in default.items()
                                                        if k != "mRecall"]))


def test_sampled_protocol_matches_bruteforce_on_its_candidates():
    text, pose, c2p = _retrieval_data(seed=1)
    got = retrieval_recall(text, pose, c2p, protocol="sampled", repeats=4, seed=3)
    cand = sample_retrieval_candidates(c2p, len(pose), 32, 4, seed=3)
    s = _cosine(text, pose)
    expected = {}
    for k in (5, 10, 20):
        hits = []
        for m in range(len(c2p)):
            for r in range(4):
                candidates = [c2p[m]] + cand["t2p_distractors"][m, r].tolist()
                ranked = sorted(candidates, key=lambda n: -s[m, n])
                hits.append(ranked.index(c2p[m]) < k)
        expected[f"t2p_R@{k}"] = 100 * np.mean(hits)
    for k in (5, 10, 20):
        hits = []
        for q, n in enumerate(cand["p2t_poses"].tolist()):
            for r in range(4):
                gt_caption = int(cand["p2t_gt"][q, r])
                candidates = [gt_caption] + cand["p2t_distractors"][q, r].tolist()
                ranked = sorted(candidates, key=lambda m: -s[m, n])
                hits.append(ranked.index(gt_caption) < k)
        expected[f"p2t_R@{k}"] = 100 * np.mean(hits)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_sampled_candidates_are_valid_and_seeded():
    _, pose, c2p = _retrieval_data(seed=2)
    cand = sample_retrieval_candidates(c2p, len(pose), 32, 5, seed=0)
    t2p = cand["t2p_distractors"].numpy()
    assert t2p.shape == (len(c2p), 5, 31)
    assert all(len(set(row)) == 31 for row in t2p.reshape(-1, 31))
    assert not (t2p == c2p[:, None, None]).any()
    assert t2p.min() >= 0 and t2p.max() < len(pose)
    poses = cand["p2t_poses"].numpy()
    np.testing.assert_array_equal(poses, np.unique(c2p))
    assert (c2p[cand["p2t_gt"].numpy()] == poses[:, None]).all()
    dis = cand["p2t_distractors"].numpy()
    assert all(len(set(row)) == 31 for row in dis.reshape(-1, 31))
    assert not (c2p[dis] == poses[:, None, None]).any()
    again = sample_retrieval_candidates(c2p, len(pose), 32, 5, seed=0)
    assert all(torch.equal(cand[k], again[k]) for k in cand)
    other = sample_retrieval_candidates(c2p, len(pose), 32, 5, seed=1)
    assert not torch.equal(cand["t2p_distractors"], other["t2p_distractors"])


@pytest.mark.parametrize("num_poses", [80, 3000])   # keys sampler and redraw sampler
def test_sampled_protocol_expectation_is_hypergeometric(num_poses):
    """E[hit@K] for a query whose ground truth is beaten by `a` of the P other candidates
    is P(X < K), X ~ Hypergeom(P, a, 31): an exact reference for the sampler + scoring."""
    captions = (1,) if num_poses > 1000 else (1, 2, 3)
    text, pose, c2p = _retrieval_data(num_poses=num_poses, captions_per_pose=captions,
                                      noise=1.5, seed=4, hub=3.0)
    if num_poses > 1000:
        text, c2p = text[:150], c2p[:150]        # fewer queries, every pose still a candidate
    repeats = 200 if num_poses < 1000 else 100
    got = retrieval_recall(text, pose, c2p, protocol="sampled", repeats=repeats, seed=5)
    s = _cosine(text, pose)
    for k in (5, 10, 20):
        gt = s[np.arange(len(c2p)), c2p]
        beaten = (s >= gt[:, None]).sum(1) - 1
        expected = hypergeom.cdf(k - 1, num_poses - 1, beaten, 31).mean() * 100
        n_draws = len(c2p) * repeats
        tol = 4 * 100 * np.sqrt(0.25 / n_draws) + 0.2
        assert abs(got[f"t2p_R@{k}"] - expected) < tol, (k, got[f"t2p_R@{k}"], expected)
        if num_poses > 1000:
            continue
        p2t = []
        for n in np.unique(c2p):
            own = np.flatnonzero(c2p == n)
            others = len(c2p) - len(own)
            per_gt = [hypergeom.cdf(k - 1, others, int(((s[:, n] >= s[m, n]) & (c2p != n)).sum()),
                                    31) for m in own]
            p2t.append(np.mean(per_gt))
        expected = np.mean(p2t) * 100
        assert abs(got[f"p2t_R@{k}"] - expected) < tol, (k, got[f"p2t_R@{k}"], expected)


def test_retrieval_errors():
    text, pose, c2p = _retrieval_data(num_poses=20, seed=6)
    with pytest.raises(ValueError, match="needs n_candidates-1=31 distractor poses but only 19"):
        retrieval_recall(text, pose, c2p, protocol="sampled")
    text2, pose2, c2p2 = _retrieval_data(num_poses=40, captions_per_pose=(1,), seed=6)
    with pytest.raises(ValueError, match="captions of other poses"):
        retrieval_recall(text2[:20], pose2, c2p2[:20], protocol="sampled")
    with pytest.raises(ValueError, match="K=40 exceeds n_candidates=32"):
        retrieval_recall(text2, pose2, c2p2, ks=(5, 40), protocol="sampled")
    with pytest.raises(ValueError, match=r"caption_to_pose values must lie in \[0, 20\)"):
        retrieval_recall(text, pose, np.full(len(c2p), 20))
    with pytest.raises(ValueError, match=r"caption_to_pose must have shape"):
        retrieval_recall(text, pose, c2p[:-1])
    with pytest.raises(ValueError, match="integer pose indices"):
        retrieval_recall(text, pose, c2p.astype(float))
    with pytest.raises(ValueError, match="embedding widths differ"):
        retrieval_recall(text[:, :4], pose, c2p)
    bad = text.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="text_emb contains NaN"):
        retrieval_recall(bad, pose, c2p)
    with pytest.raises(ValueError, match=r"text_emb must have shape"):
        retrieval_recall(text[:0], pose, c2p[:0])
    with pytest.raises(ValueError, match="protocol must be"):
        retrieval_recall(text, pose, c2p, protocol="random")


def _recall_with_groups_loop(text, pose, groups, ks):
    """Brute force of retrieval_recall(full, pairs i<->i, pose_groups): every competitor of
    query i outside i's group that scores >= the ground truth beats it."""
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    p = pose / np.linalg.norm(pose, axis=1, keepdims=True)
    s = t @ p.T
    m = len(groups)
    t2p, p2t = [], []
    for i in range(m):
        others = [j for j in range(m) if groups[j] != groups[i]]
        t2p.append(sum(s[i, j] >= s[i, i] for j in others))
        p2t.append(sum(s[j, i] >= s[i, i] for j in others))   # pose i vs the captions j
    out = {}
    for name, beaten in (("t2p", t2p), ("p2t", p2t)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean([b < k for b in beaten])
    out["mRecall"] = float(np.mean(list(out.values())))
    return out


def test_full_recall_with_pose_groups_matches_loop_and_unique_pose_protocol():
    from poserft.eval.metrics import retrieval_recall

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(10), 3)                      # 3 captions per pose
    text = rng.normal(size=(30, 6))
    pose = rng.normal(size=(30, 6))
    ks = (1, 2, 5)
    got = retrieval_recall(text, pose, np.arange(30), ks=ks, protocol="full", pose_groups=groups)
    want = _recall_with_groups_loop(text, pose, groups, ks)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    # identical copies of the ground-truth poses (the oracle of the text->pose evaluation):
    # without groups a caption's own copies tie with its ground truth and beat it
    copies = rng.normal(size=(10, 6))[groups]
    text = copies + 0.3 * rng.normal(size=(30, 6))               # captions near their pose
    ks = (1, 3, 5)
    grouped = retrieval_recall(text, copies, np.arange(30), ks=ks, protocol="full", pose_groups=groups)
    plain = retrieval_recall(text, copies, np.arange(30), ks=ks, protocol="full")
    want = _recall_with_groups_loop(text, copies, groups, ks)
    for key in want:
        assert grouped[key] == pytest.approx(want[key]), key
    # beaten by its 2 copies: they score the same as the ground truth up to the last bit of
    # the matmul (which rows of a GEMM tile round alike depends on the CPU's kernel), and a
    # tie counts against the query, so R@1 is at most a few lucky roundings
    assert plain["t2p_R@1"] < 10.0 and plain["t2p_R@3"] > 0.0
    assert grouped["t2p_R@1"] > 50.0
    with pytest.raises(ValueError, match="protocol='full'"):
        retrieval_recall(text, pose, np.arange(30), ks=ks, protocol="sampled", n_candidates=8,
                         pose_groups=groups)
    with pytest.raises(ValueError, match="pose_groups must have shape"):
        retrieval_recall(text, pose, np.arange(30), pose_groups=groups[:5])
