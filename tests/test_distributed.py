"""Synchronized in-place batch norm and DDP training across processes (CPU, gloo, 2 ranks).

Each test starts two processes of tests/_dist_worker.py with torchrun's environment and compares
what they computed with one process on the concatenated batch, in float64.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import effseg
from effseg.nn import InPlaceABN, InPlaceABNSync, RecomputeBlock3d, convert_sync

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as worker  # noqa: E402

from conftest import child_env, needs_cuda, needs_extension, run_python  # noqa: E402

WORKER = Path(__file__).with_name("_dist_worker.py")

pytestmark = [needs_extension,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, out: Path, *args: str, world: int = 2, timeout: float = 240,
          expect_ok: bool = True) -> list[subprocess.CompletedProcess]:
    """Runs `world` ranks of the worker; bounded: ranks still running at `timeout` are killed
    and the test fails."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: ranks still running after {timeout} s (a hang)")
    if expect_ok:
        for rank, p in enumerate(done):
            assert p.returncode == 0, f"rank {rank} failed:\n{p.stderr[-4000:]}"
    return done


def load(out: Path, scenario: str, world: int = 2) -> list[dict]:
    return [torch.load(out / f"{scenario}-rank{r}.pt", weights_only=False)
            for r in range(world)]


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def abn_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("abn")
    spawn("abn", out)
    return load(out, "abn")


@pytest.mark.parametrize("case", worker.ABN_CASES, ids=[c[0] for c in worker.ABN_CASES])
def test_sync_abn_on_two_ranks_equals_abn_on_the_concatenated_batch(abn_results, case):
    name, sizes, _, _, _, layout = case
    x, dy, params = worker.abn_case_data(case)
    ref = worker.abn_module(case, params, InPlaceABN)
    xg = x.clone().requires_grad_()
    y = ref(xg * 1.0)
    y.backward(dy)
    ref.eval()
    with torch.no_grad():
        y_eval = ref(x.clone())
    for rank, results in enumerate(abn_results):
        got = results[name]
        sl = worker.rank_slice(sizes, rank)
        close(got["y"], y.detach()[sl], f"rank {rank} output")
        close(got["dx"], xg.grad[sl], f"rank {rank} input gradient")
        close(got["rm"], ref.running_mean, f"rank {rank} running mean")
        close(got["rv"], ref.running_var, f"rank {rank} running var (unbiased, global count)")
        assert int(got["nbt"]) == int(ref.num_batches_tracked) == 1
        close(got["y_eval"], y_eval[sl], f"rank {rank} eval output (running statistics)")
        assert got["channels_last"] == (layout == "channels_last")
    # Parameter gradients are each rank's share; DDP adds them up (and divides by the world).
    close(abn_results[0][name]["dw"] + abn_results[1][name]["dw"], ref.weight.grad, "dweight")
    close(abn_results[0][name]["db"] + abn_results[1][name]["db"], ref.bias.grad, "dbias")


def test_recomputing_block_replays_global_statistics_without_collectives(tmp_path):
    out = tmp_path / "block"
    spawn("block", out)
    ranks = load(out, "block")
    for r in ranks:
        # One all-gather per norm in forward, one all-reduce per norm in backward, nothing in
        # the recomputation.
        assert r["forward"] == {"all_gather": 2, "all_reduce": 0}
        assert r["backward"] == {"all_gather": 2, "all_reduce": 2}
    torch.manual_seed(0)
    ref = RecomputeBlock3d(2, 4, stride=2, norm="batch", act="relu", residual=True).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 8, 8, 6, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(3, 4, 4, 4, 3, generator=g, dtype=torch.float64)
    y = ref(x)
    y.backward(dy)
    close(torch.cat([r["y"] for r in ranks]), y.detach(), "block output")
    close(torch.cat([r["dx"] for r in ranks]), x.grad, "block input gradient")
    for k, p in ref.named_parameters():
        close(ranks[0]["grads"][k] + ranks[1]["grads"][k], p.grad, f"gradient of {k}")
    for k, b in ref.named_buffers():
        for r in ranks:
            close(r["buffers"][k].to(b.dtype), b, f"buffer {k}")


def test_two_ddp_steps_on_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    out = tmp_path / "ddp"
    spawn("ddp", out)
    ranks = load(out, "ddp")
    model = worker.ddp_model("batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, label in worker.ddp_batches(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), label)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    state = model.state_dict()
    for rank, r in enumerate(ranks):
        assert r["state"].keys() == state.keys()
        for k in state:
            close(r["state"][k].to(state[k].dtype), state[k], f"rank {rank} {k} after 2 steps")
    for step, loss in enumerate(losses):
        close((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2, loss,
              f"loss of step {step}")


def test_a_rank_that_exits_makes_the_others_fail_with_a_clear_error(tmp_path):
    started = time.monotonic()
    done = spawn("dead_rank", tmp_path / "dead", timeout=120, expect_ok=False)
    assert done[1].returncode == 0  # the rank that left
    assert done[0].returncode != 0
    assert "effseg: the statistics all-gather of a synchronized batch norm failed" in \
        done[0].stderr, done[0].stderr[-3000:]
    assert time.monotonic() - started < 120


def test_without_torch_distributed_the_sync_norm_is_the_local_one_and_warns_once():
    assert not dist.is_initialized()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    sync, local = InPlaceABNSync(3).double(), InPlaceABN(3).double()
    from effseg.ops import sync as sync_ops

    sync_ops._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = sync(x.clone())
        sync(x.clone())
    assert sum("without torch.distributed" in str(w.message) for w in caught) == 1
    close(a, local(x.clone()), "fallback output")
    local(x.clone())
    close(sync.running_var, local.running_var, "fallback running var")


def test_convert_sync_keeps_parameters_buffers_and_eval_outputs():
    torch.manual_seed(2)
    model = effseg.models.FullVolumeFCN(in_channels=1, out_channels=2, channels=(4, 8),
                                        strides=(1, 2), norm="batch").double()
    stock = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1),
                                torch.nn.BatchNorm3d(3), torch.nn.ReLU())
    model.train()
    model(torch.randn(2, 1, 8, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    before = model(x)
    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    names = {k for k, m in model.named_modules() if type(m) is InPlaceABN}
    assert names
    converted = convert_sync(model)
    assert converted is model
    synced = {k for k, m in model.named_modules() if isinstance(m, InPlaceABNSync)}
    assert synced == names
    for k, p in model.named_parameters():
        assert p is params[k], k  # the same tensors: optimizers keep working
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert torch.equal(model(x), before)
    plain = convert_sync(stock)
    assert isinstance(plain[1], torch.nn.SyncBatchNorm)


def test_norm_sync_batch_builds_fcn_and_stock_twins():
    fcn = effseg.models.FullVolumeFCN(in_channels=1, out_channels=2, channels=(4, 8),
                                      strides=(1, 2), norm="sync_batch")
    assert any(isinstance(m, InPlaceABNSync) for m in fcn.modules())
    stock = effseg.models.StockUNet3d(3, 1, 2, (4, 8), (1, 2), norm="sync_batch")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in stock.modules())


# ---------------------------------------------------------------- training under DDP

@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    pytest.importorskip("nibabel")
    from effseg.pipeline.data import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("dist") / "phantom", num_cases=4,
                                shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=21)


@pytest.mark.slow
def test_ddp_training_stops_on_every_rank_and_resumes_to_the_uninterrupted_run(phantom,
                                                                               tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    spawn("train", tmp_path / "w1", str(phantom), str(full), "0", "new")
    whole = load(tmp_path / "w1", "train")
    assert [r["interrupted"] for r in whole] == [False, False]
    for a, b in zip(whole[0]["history"], whole[1]["history"]):  # the same record on each rank
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    lines = (full / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    # A Ctrl-C on rank 1 after its first step stops both ranks after that step; rank 0 saves.
    spawn("train", tmp_path / "w2", str(phantom), str(part), "1", "new")
    stopped = load(tmp_path / "w2", "train")
    assert [r["interrupted"] for r in stopped] == [True, True]
    state = torch.load(part / "last.pt", weights_only=True)
    assert state["progress"]["step_in_epoch"] == 1 and state["progress"]["world_size"] == 2

    spawn("train", tmp_path / "w3", str(phantom), str(part), "0", "resume")
    resumed = load(tmp_path / "w3", "train")
    assert [r["epochs_done"] for r in resumed] == [2, 2]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in a["progress"]["history"]] == \
        [r["train_loss"] for r in b["progress"]["history"]]
    assert any("InPlaceABN" in k or "running_mean" in k for k in a["model"])

    # Mid-epoch state of a 2-process run cannot be continued by one process.
    from effseg.pipeline.train import RunError, TrainConfig, train

    spawn("train", tmp_path / "w4", str(phantom), str(tmp_path / "again"), "1", "new")
    with pytest.raises(RunError, match="resume it with 2"):
        train(TrainConfig(out=str(tmp_path / "again")), resume=True)


def test_a_rank_that_dies_during_training_ends_the_run_with_an_error(phantom, tmp_path):
    started = time.monotonic()
    done = spawn("train", tmp_path / "w", str(phantom), str(tmp_path / "run"), "0", "die",
                 timeout=180, expect_ok=False)
    assert done[1].returncode == 3
    assert done[0].returncode != 0
    assert "RunError: rank 0: a collective with the other ranks failed" in done[0].stderr, \
        done[0].stderr[-3000:]
    assert time.monotonic() - started < 180


def test_torchrun_launches_effseg_train(phantom, tmp_path):
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "effseg", "train", "--out", str(tmp_path / "run"), "--data", str(phantom),
         "--labels", "liver", "--preset", "tiny", "--epochs", "1", "--norm", "batch",
         "--device", "cpu", "--dist-timeout", "60"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes (DDP)" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "best.pt").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_convert_with_sync_fuses_stock_batch_norm_and_activation_pairs_first():
    torch.manual_seed(4)
    stock = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.BatchNorm3d(3),
                                torch.nn.LeakyReLU(0.02), torch.nn.Conv3d(3, 2, 1),
                                torch.nn.BatchNorm3d(2), torch.nn.ReLU()).double()
    stock.train()
    stock(torch.randn(2, 1, 6, 6, 6, dtype=torch.float64))
    stock.eval()
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    before = stock(x)
    synced, report = effseg.convert(stock, sync=True)
    assert [r.path for r in report.replaced] == ["1"]
    kinds = [type(m).__name__ for m in synced]
    # BatchNorm + LeakyReLU fused, then synchronized; BatchNorm + ReLU (not invertible) is
    # synchronized as torch's SyncBatchNorm.
    assert "InPlaceABNSync" in kinds and "SyncBatchNorm" in kinds and "LeakyReLU" not in kinds
    torch.testing.assert_close(synced(x), before, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@needs_cuda
def test_sync_norm_over_nccl_on_one_gpu_equals_the_local_norm():
    """NCCL with one rank: the real collectives on a GPU, nothing to wait for (a subprocess, so
    the process group does not outlive the test)."""
    proc = run_python("""
import socket, torch, torch.distributed as dist
from effseg.nn import InPlaceABN, InPlaceABNSync, RecomputeBlock3d
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.cuda.set_device(0)
torch.manual_seed(0)
x = torch.randn(3, 8, 9, 10, 11, device="cuda")
g = torch.randn_like(x)
outs = []
for cls in (InPlaceABN, InPlaceABNSync):
    m = cls(8, activation="elu").cuda()
    xi = x.clone().requires_grad_()
    y = m(xi * 1.0)
    y.backward(g)
    outs.append((y.detach(), xi.grad, m.weight.grad, m.running_var))
for a, b in zip(*outs):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
torch.manual_seed(1)
block = RecomputeBlock3d(8, 8, norm="sync_batch").cuda()
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = block(x.clone().requires_grad_())
out.float().sum().backward()
assert all(torch.isfinite(p.grad).all() for p in block.parameters())
dist.destroy_process_group()
print("nccl ok")
""", timeout=90)  # well inside the GPU check's time for the CUDA tests
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]
