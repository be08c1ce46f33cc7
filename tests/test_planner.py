"""The memory planner's prediction against a measured training step (CPU: peak RSS; CUDA: the
allocator's peak, bf16, the default network)."""
import math
import sys

import pytest
import torch

from conftest import needs_cuda
import effseg.pipeline.planner as planner
from effseg.pipeline.planner import (Fit, ModelConfig, calibrate, choose, conv_backends,
                                     measure_step, parse_bytes, plan, scaled_shape)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="CPU peak memory is measured through Linux /proc")

CONFIG = ModelConfig(channels=(8, 16, 32), strides=(1, 2, 2))


@pytest.mark.slow
def test_prediction_within_15_percent_of_a_measured_step():
    shape = (96, 96, 96)
    fit = calibrate(CONFIG, True, shape, torch.device("cpu"))
    assert all(v < math.prod(shape) for v, _ in fit.points), "calibration must be smaller"
    # 60^3 and 68^3 (the default ladder) would compute the lean level's input gradient whole,
    # 96^3 in slabs: calibration moves to volumes that use slabs as the target does
    assert fit.same_backends, fit.points
    measured = measure_step(CONFIG, True, shape, torch.device("cpu"))
    predicted = fit.predict(math.prod(shape))
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured, fit.points)


@needs_cuda
@pytest.mark.cuda
def test_prediction_within_15_percent_of_a_measured_step_on_cuda():
    # the default FullVolumeFCN in bf16, calibrated on volumes up to 128^3, predicting 192^3
    shape, cuda = (192, 192, 192), torch.device("cuda")
    config = ModelConfig(out_channels=3)
    fit = calibrate(config, True, shape, cuda, torch.bfloat16, cap_voxels=128 ** 3)
    assert fit.linear, fit.points
    measured = measure_step(config, True, shape, cuda, torch.bfloat16)
    predicted = fit.predict(math.prod(shape))
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured, fit.points)


@pytest.mark.slow
def test_plan_picks_the_first_recompute_setting_that_fits():
    # calibrated at 12^3 to 20^3: every convolution of the two finest levels runs on the
    # target's backend (ATen's slow kernel for these small float32 inputs)
    shape = (32, 32, 28)
    cpu = torch.device("cpu")
    roomy = plan(CONFIG, 2**40, shape, cpu, cap_voxels=20 ** 3)
    assert all(o.fit.same_backends for o in roomy.options)
    assert [sum(o.recompute) for o in roomy.options] == [0, 1, 2, 3]
    assert roomy.chosen is roomy.options[0]
    for option in roomy.options:
        assert len({v for v, _ in option.fit.points}) == 3
    # a budget that only some settings meet: the first of them (least recompute) is chosen
    assert math.prod(roomy.largest_shape) > math.prod(shape)
    assert all(n % 4 == 0 for n in roomy.largest_shape)
    preds = sorted(o.predicted for o in roomy.options)
    budget = int((preds[0] + preds[-1]) / 2)
    chosen = choose(roomy.options, budget)
    fitting = [o for o in roomy.options if o.predicted <= budget]
    assert fitting and chosen is fitting[0]
    assert all(o.predicted > budget for o in roomy.options[:roomy.options.index(chosen)])
    assert choose(roomy.options, 1024) is None


def test_fit_and_units():
    f = Fit.of([(100, 1100), (200, 2100), (300, 3100)])
    assert f.predict(1000) == pytest.approx(10100)
    assert f.max_voxels(5100) == 500
    assert parse_bytes("80GB") == 80 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert scaled_shape((100, 100, 50), 100 * 100 * 50 / 8, (4, 4, 4)) == (48, 48, 24)


def test_a_failed_calibration_process_raises_with_its_error():
    """The fresh processes of a CPU calibration: one that fails (here the network cannot be
    built) raises a RuntimeError naming the volume and ending with the process's own error,
    and the other processes are not left running."""
    from pathlib import Path

    def children():
        return {pid for f in Path("/proc/self/task").glob("*/children")
                for pid in f.read_text().split()}

    bad = ModelConfig(1, 2, (4, 8), (1, 2), "nonsense-norm")
    before = children()
    with pytest.raises(RuntimeError, match=r"calibration step at \(8, 8, 8\) failed(?s:.*)"
                                           r"nonsense-norm"):
        planner.measure_steps(bad, True, [(8, 8, 8), (12, 12, 12)], torch.device("cpu"))
    assert children() <= before


def test_calibration_across_an_algorithm_switch_is_flagged(monkeypatch):
    """At 48x48x40 the finest decoder level's skip fusion runs on oneDNN; on calibration volumes
    of at most 32^3 it would run on ATen's slow kernel (im2col scratch): a line through them is
    flagged, never chosen, however well it fits the points and however large the budget."""
    cpu = torch.device("cpu")
    shape = (48, 48, 40)
    target = conv_backends(CONFIG, shape, cpu)
    small = conv_backends(CONFIG, (32, 32, 28), cpu)
    assert target != small
    assert int(torch._C._ConvBackend.Mkldnn) in target
    # a perfectly linear (fake) measurement: only the backends can flag it
    monkeypatch.setattr(planner, "measure_steps", lambda config, recompute, shapes, *args: [
        1000 + 7 * math.prod(s) for s in shapes])
    fit = calibrate(CONFIG, True, shape, cpu, cap_voxels=32 ** 3)
    assert not fit.same_backends and not fit.linear
    assert len(fit.points) == 3
    options = [planner.Option((True,) * 3, fit, fit.predict(math.prod(shape)))]
    assert choose(options, 2**40) is None
    same = calibrate(CONFIG, True, (32, 32, 28), cpu, cap_voxels=20 ** 3)
    assert same.same_backends and same.linear
