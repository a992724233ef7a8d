"""A toy hybrid-action problem that HyGRPO must solve: it exercises advantages, both
clipped surrogates, both KL terms and the valid mask end to end, without the MLLM."""

import torch

from poserft.model.heads import PoseGaussian
from poserft.rl import core

D, K = 3, 4                      # pose dims, "token" vocabulary
TARGET = torch.tensor([1.0, -0.5, 0.8])
GOOD_TOKEN = 2                   # discrete reward 1 for it, 0 otherwise
NO_POSE_TOKEN = 0                # this token emits no pose (invalid continuous action)


class ToyPolicy(torch.nn.Module):
    """Unconditional hybrid policy: Categorical over K tokens, diagonal Gaussian over D."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(K))
        self.mean = torch.nn.Parameter(torch.zeros(D))
        self.log_std = torch.nn.Parameter(torch.full((D,), -0.7))

    def dists(self, n):
        cat = torch.distributions.Categorical(logits=self.logits.expand(n, K))
        # the policy's own pose distribution type (its KL is the analytic pose KL of core)
        gauss = PoseGaussian(self.mean.expand(n, D), self.log_std.exp().expand(n, D))
        return cat, gauss


def run(mode, steps=40, B=4, G=8, mu=2, seed=0):
    torch.manual_seed(seed)
    policy, ref = ToyPolicy(), ToyPolicy()
    ref.load_state_dict(policy.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    params = core.HyGRPOParams(mode=mode, beta_token=0.01, beta_pose=0.01)
    groups = torch.arange(B).repeat_interleave(G)
    history = []
    for _ in range(steps):
        n = B * G
        with torch.no_grad():
            cat, gauss = policy.dists(n)
            tokens, poses = cat.sample(), gauss.sample()
            old_tok = cat.log_prob(tokens)[:, None]
            old_pose = gauss.log_prob(poses)
            ref_cat, ref_gauss = ref.dists(n)
            ref_tok = ref_cat.log_prob(tokens)[:, None]
        valid = tokens != NO_POSE_TOKEN
        r_d = (tokens == GOOD_TOKEN).float()
        r_c = -(poses - TARGET).norm(dim=-1)
        history.append((r_d.mean().item(), r_c[valid].mean().item()))
        f_adv, _ = core.grpo_advantage(r_d, groups)
        c_adv, _ = core.grpo_advantage(torch.where(valid, r_c, torch.nan), groups, valid)
        for _ in range(mu):
            cat, gauss = policy.dists(n)
            loss, metrics = core.hygrpo_loss(
                params=params, token_logprobs=cat.log_prob(tokens)[:, None],
                old_token_logprobs=old_tok, ref_token_logprobs=ref_tok,
                completion_mask=torch.ones(n, 1, dtype=torch.bool), token_advantages=f_adv,
                pose_logprob=gauss.log_prob(poses), old_pose_logprob=old_pose,
                pose_kl_to_ref=core.pose_kl("analytic", gauss, ref_gauss, poses),
                pose_valid=valid, pose_advantages=c_adv)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return policy, history, metrics


def test_hygrpo_learns_both_actions():
    policy, history, metrics = run("hygrpo")
    first = torch.tensor(history[:8]).mean(0)
    last = torch.tensor(history[-8:]).mean(0)
    dist0 = TARGET.norm().item()
    dist1 = (policy.mean.detach() - TARGET).norm().item()
    assert dist1 < 0.35 * dist0, (dist0, dist1)
    assert last[1] > first[1] + 0.5          # continuous reward rises (it is -distance)
    assert last[0] > first[0] + 0.3          # discrete reward rises from ~1/K
    assert torch.softmax(policy.logits.detach(), 0)[GOOD_TOKEN] > 0.6
    for key in ("token/clipfrac", "pose/clipfrac", "token/kl_ref", "pose/kl_ref"):
        assert key in metrics


def test_grpo_mode_leaves_the_pose_untouched():
    """With the continuous branch off, no gradient reaches the Gaussian head."""
    policy, history, _ = run("grpo", steps=10)
    assert torch.equal(policy.mean.detach(), torch.zeros(D))
    assert torch.softmax(policy.logits.detach(), 0)[GOOD_TOKEN] > 0.4
