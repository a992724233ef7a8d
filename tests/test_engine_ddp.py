"""Two CPU processes under torchrun (gloo DDP): identical replicas, averaged gradients,
rank-0-only checkpoints. Slow-marked (spawns processes)."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    from torch import nn
    from poserft.train.config import EngineConfig, OptimConfig
    from poserft.train.engine import TrainEngine

    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    eng = TrainEngine(net, OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0),
                      EngineConfig(checkpoint_every=1), 1, sys.argv[1])
    rank = eng.dist.rank
    x = torch.full((4, 3), float(rank + 1))          # different data per rank
    def loss_fn(model, mb):
        loss = model(mb).pow(2).mean()
        return loss, {"loss": loss.item()}
    for step in eng.steps():
        eng.train_step([x], loss_fn)
    out = {"rank": rank, "world": eng.dist.world_size, "weight": net.weight.detach().tolist(),
           "bias": net.bias.item()}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
''')


def test_two_process_ddp_averages_gradients(tmp_path):
    import torch
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["weight"] == r1["weight"] and r0["bias"] == r1["bias"]       # replicas in sync
    # expected: one AdamW step on the gradient averaged over the two ranks' data
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    loss = sum(ref(torch.full((4, 3), float(r + 1))).pow(2).mean() for r in (0, 1)) / 2
    loss.backward()
    opt.step()
    torch.testing.assert_close(torch.tensor(r0["weight"]), ref.weight.detach(), rtol=1e-6, atol=1e-7)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000001"]
