"""effseg.memory on known answers: what the trackers count, and what they must not."""
import pytest
import torch

from effseg.memory import peak_allocated, saved_bytes, step_peak


def test_new_tensor_counts_its_bytes():
    w = torch.randn(1000)
    assert peak_allocated(lambda: w + 1) == 4000
    assert peak_allocated(lambda: torch.empty(10, 10, dtype=torch.float64)) == 800


def test_views_and_detach_of_existing_tensors_count_nothing():
    w = torch.randn(25_000)
    assert peak_allocated(lambda: w.detach()) == 0
    assert peak_allocated(lambda: w.view(5, 5000)[1:3].t()) == 0
    assert peak_allocated(lambda: w.expand(3, -1)) == 0


def test_in_place_update_of_existing_tensor_counts_nothing():
    w = torch.randn(25_000)
    before = w.clone()
    assert peak_allocated(lambda: w.add_(1).mul_(2)) == 0
    torch.testing.assert_close(w, (before + 1) * 2)


def test_in_place_update_of_new_tensor_counted_once():
    def fn():
        a = torch.zeros(1000)      # 4000 B
        a.add_(1).mul_(3)          # same storage: nothing more
        return a[::2]              # a view: nothing more
    assert peak_allocated(fn) == 4000


def test_storage_grown_by_resize_counts_the_growth():
    def fn():
        a = torch.empty(10)
        a.resize_(1000)
        return a
    assert peak_allocated(fn) == 4000


def test_freed_existing_storage_then_new_allocation_is_counted():
    """A pre-existing storage freed inside the call may lend its address to a new one: the new
    one is still counted."""
    holder = [torch.randn(1000)]

    def fn():
        holder[0].add_(0)              # seen: pre-existing
        holder.pop()                   # freed
        return torch.randn(1000)       # may reuse the address
    assert peak_allocated(fn) == 4000


def test_optimizer_step_counts_only_its_new_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2000))
    p.grad = torch.randn(2000)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=False)
    # The first step allocates the momentum buffer (a copy of the gradient) and updates p in
    # place; the second updates both in place.
    assert peak_allocated(opt.step) == 8000
    assert peak_allocated(opt.step) == 0


def test_adam_step_counts_state_not_parameters():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50_000)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, foreach=False)
    state = 3 * 2 * 50_000 * 4  # exp_avg and exp_avg_sq per parameter
    first = peak_allocated(opt.step)
    # The state, plus Adam's parameter-sized temporaries (sqrt(v) and its quotient, and the
    # previous parameter's denominator that its loop variable still holds); the 600 kB of
    # parameters and moments updated in place are not counted.
    assert state <= first <= state + 3 * 50_000 * 4, first
    second = peak_allocated(opt.step)
    assert second <= 3 * 50_000 * 4, second


def test_training_step_peak_excludes_parameters_and_input():
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 1000, bias=False)
    x = torch.randn(4, 1000)

    def step():
        model(x).sum().backward()

    # The output (16 kB), its gradient (a 16 kB expand of a scalar: 4 B) and the weight's
    # gradient (4 MB); the weight and the input are not new.
    peak = peak_allocated(step)
    assert 4_000_000 <= peak <= 4_000_000 + 2 * 16_000 + 64, peak
    model.weight.grad = None


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.InstanceNorm3d(16),
                               torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(16, 16, 3, padding=1),
                               torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(16, 1, 3, padding=1))


def test_step_peak_on_cpu_is_at_least_the_tensors_of_the_step():
    """RSS-based: after steps that leave freed memory in the allocator's arenas and gradients
    that the step frees and allocates again, the figure still covers every tensor the step
    held at once (it read about a quarter of them before it returned memory kept from earlier
    frees and freed old gradients before reading its base)."""
    model = _net()
    x = torch.randn(1, 1, 40, 40, 40)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model(x).square().mean().backward()
        opt.step()

    tensors = peak_allocated(step)       # leaves gradients behind, and freed arenas
    step()
    assert step_peak(model, x, optimizer=opt) >= tensors
    assert all(p.grad is None for p in model.parameters())


def test_step_peak_refuses_a_figure_below_the_tensors(monkeypatch):
    from effseg import memory
    model = _net()
    x = torch.randn(1, 1, 24, 24, 24)
    # An RSS that never rises above its base, as when a step runs in memory kept resident by
    # an allocator: the figure would be 0, so it is refused.
    monkeypatch.setattr(memory, "rss_bytes", lambda: 1 << 30)
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 1 << 30)
    with pytest.raises(RuntimeError, match="reused memory that was resident"):
        step_peak(model, x)
