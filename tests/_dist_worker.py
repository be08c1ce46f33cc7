"""One rank of a multi-process test (tests/test_distributed.py starts it, once per rank, with
torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    python tests/_dist_worker.py SCENARIO OUT_DIR

Each scenario writes what its rank computed to OUT_DIR/<scenario>-rank<R>.pt; the test compares
it with a one-process computation on the concatenated batch.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import effseg
from effseg.models import FullVolumeFCN
from effseg.nn import InPlaceABNSync, RecomputeBlock3d

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))

# Batch norm cases: (name, per-rank batch sizes, channels, spatial shape, activation, layout).
ABN_CASES = [
    ("uneven-leaky", (1, 3), 3, (5, 6, 7), "leaky_relu", "contiguous"),
    ("uneven-elu-channels-last", (3, 2), 4, (4, 5, 3), "elu", "channels_last"),
    ("even-identity", (2, 2), 2, (3, 4, 5), "identity", "contiguous"),
]


def abn_case_data(case):
    """The global batch, output gradient and module parameters of a case (the same on every
    rank and in the test)."""
    name, sizes, C, spatial, _, _ = case
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = sum(sizes)
    x = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64) * 1.7 + 0.4
    dy = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
    params = {k: torch.randn(C, generator=g, dtype=torch.float64) for k in ("w", "b", "rm")}
    params["rv"] = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, dy, params


def rank_slice(sizes, rank=RANK):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def abn_module(case, params, cls):
    _, _, C, _, act, _ = case
    m = cls(C, activation=act, momentum=0.3).double()
    with torch.no_grad():
        m.weight.copy_(params["w"])
        m.bias.copy_(params["b"])
        m.running_mean.copy_(params["rm"])
        m.running_var.copy_(params["rv"])
    return m


def run_abn(out: Path) -> dict:
    results = {}
    for case in ABN_CASES:
        name, sizes, _, _, _, layout = case
        x, dy, params = abn_case_data(case)
        m = abn_module(case, params, InPlaceABNSync)
        fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
        xr = x[rank_slice(sizes)].contiguous(memory_format=fmt).requires_grad_()
        y = m(xr * 1.0)  # a non-leaf input: the op overwrites it
        y.backward(dy[rank_slice(sizes)].contiguous(memory_format=fmt))
        m.eval()
        with torch.no_grad():
            y_eval = m(x[rank_slice(sizes)].clone())
        results[name] = {"y": y.detach(), "dx": xr.grad, "dw": m.weight.grad,
                         "db": m.bias.grad, "rm": m.running_mean, "rv": m.running_var,
                         "nbt": m.num_batches_tracked, "y_eval": y_eval,
                         "channels_last": y.is_contiguous(memory_format=torch.channels_last_3d)}
    return results


class CollectiveCounter:
    """Counts the collectives effseg issues (patched into torch.distributed)."""

    def __init__(self):
        self.counts = {"all_gather": 0, "all_reduce": 0}
        for name in self.counts:
            real = getattr(dist, name)
            setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return real(*args, **kwargs)
        return counted

    def snapshot(self):
        return dict(self.counts)


def run_block(out: Path) -> dict:
    """A recomputing block with synchronized norms: the collectives of forward and backward,
    and its results, for comparison with the block on the concatenated batch."""
    counter = CollectiveCounter()
    torch.manual_seed(0)
    block = RecomputeBlock3d(2, 4, stride=2, norm="sync_batch", act="relu",
                             residual=True).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 8, 8, 6, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 4, 4, 4, 3, generator=g, dtype=torch.float64)
    sizes = (1, 2)
    xr = x[rank_slice(sizes)].clone().requires_grad_()
    y = block(xr)
    after_forward = counter.snapshot()
    y.backward(dy[rank_slice(sizes)])
    after_backward = counter.snapshot()
    return {"forward": after_forward, "backward": after_backward, "y": y.detach(),
            "dx": xr.grad, "grads": {k: p.grad for k, p in block.named_parameters()},
            "buffers": {k: b.clone() for k, b in block.named_buffers()}}


def ddp_batches(world: int, steps: int = 2):
    """`steps` global batches of one volume per rank."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(world, 1, 16, 16, 12, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (world, 16, 16, 12), generator=g))
            for _ in range(steps)]


def ddp_model(norm: str) -> FullVolumeFCN:
    torch.manual_seed(3)
    return FullVolumeFCN(in_channels=1, out_channels=3, channels=(4, 8, 8), strides=(1, 2, 2),
                         norm=norm).double()


def run_ddp(out: Path) -> dict:
    """Two SGD steps of a small FullVolumeFCN under DDP, each rank on its share of the batch."""
    from torch.nn.parallel import DistributedDataParallel

    net = effseg.nn.convert_sync(ddp_model("batch"))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, label in ddp_batches(WORLD):
        opt.zero_grad()
        sl = slice(RANK, RANK + 1)
        loss = F.cross_entropy(model(x[sl]), label[sl])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}


def run_dead_rank(out: Path) -> dict:
    """Rank 1 exits before the first layer; rank 0 must fail with effseg's error, not hang."""
    if RANK == 1:
        os._exit(0)
    m = InPlaceABNSync(3).double()
    m(torch.randn(2, 3, 4, 4, 4, dtype=torch.float64))
    return {}


def run_train(out: Path) -> dict:
    """effseg.pipeline.train under DDP, as torchrun would start it. argv: data dir, run dir, stop step
    (0: no stop; else rank 1 gets a real SIGINT after that many steps), and "new", "resume" or
    "die" (a new run whose rank 1 exits after its first step)."""
    import effseg.pipeline.train as train_module
    from effseg.pipeline.train import TrainConfig, train

    data, run, stop_after, resume = sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
    if resume == "die" and RANK == 1:  # rank 1 dies after its first step
        real = train_module.train_step

        def step_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(3)

        train_module.train_step = step_then_die
    if stop_after and RANK == 1:
        real = train_module.train_step
        steps = {"n": 0}

        def step_then_ctrl_c(*args, **kwargs):
            loss = real(*args, **kwargs)
            steps["n"] += 1
            if steps["n"] == stop_after:
                os.kill(os.getpid(), signal.SIGINT)
            return loss

        train_module.train_step = step_then_ctrl_c
    if resume == "resume":
        result = train(TrainConfig(out=run), resume=True, dist_timeout=60)
    else:
        result = train(TrainConfig(out=run, data=data, labels=["liver", "lung_left", "lung_right"],
                                   model="tiny", epochs=2, lr=1e-2, seed=3, norm="batch",
                                   val_fraction=0.34, device="cpu"),
                       dist_timeout=60)
    return {"interrupted": result.interrupted, "epochs_done": result.epochs_done,
            "history": result.history}


SCENARIOS = {"abn": run_abn, "block": run_block, "ddp": run_ddp, "dead_rank": run_dead_rank,
             "train": run_train}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if scenario != "train":  # train opens the group itself, as under torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    results = SCENARIOS[scenario](out)
    torch.save(results, out / f"{scenario}-rank{RANK}.pt")
    if dist.is_initialized():
        gc.collect()  # DDP wrappers in reference cycles go before their process group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
