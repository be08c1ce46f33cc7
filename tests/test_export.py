"""Export: under torch.export the effseg modules record stock ops (batch_norm / instance_norm +
activation, out of place), so exported programs hold no effseg op, match eager, and go to ONNX."""
import copy

import pytest
import torch
from torch import nn

import effseg
from effseg.models import FullVolumeFCN
from effseg.nn import InPlaceABN, InPlaceAIN

D = torch.float64


def _effseg_ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes
            if n.op == "call_function" and "effseg" in str(n.target)]


def _trained_eval(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A few training forwards (non-trivial running statistics), then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x.clone() * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("cls, kwargs", [
    (InPlaceABN, {"activation": "leaky_relu", "activation_param": 0.2}),
    (InPlaceABN, {"activation": "elu", "activation_param": 0.5, "affine": False}),
    (InPlaceAIN, {"activation": "identity", "track_running_stats": True}),
    (InPlaceAIN, {"activation": "leaky_relu"}),
])
def test_norm_module_exports_to_stock_ops(cls, kwargs):
    m = cls(5, **kwargs).to(D)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.5, -1.5, 0.0, 2e-5, 1.0]))  # 0 and 2e-5: clamped
            m.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 4, 6, 3, dtype=D)
    _trained_eval(m, x)
    ep = torch.export.export(m, (x.clone(),))
    assert _effseg_ops(ep) == []
    exported = ep.module()(x)
    # eager eval keeps the in-place op: it overwrites its input
    x_eager = x.clone()
    with torch.no_grad():
        eager = m(x_eager)
    assert eager.data_ptr() == x_eager.data_ptr()
    torch.testing.assert_close(exported, eager)


def _fcn():
    return FullVolumeFCN(channels=(4, 8, 8), strides=(1, 2, 2)).to(D)


def test_full_volume_fcn_exports_and_matches_eager():
    x = torch.randn(1, 1, 12, 16, 8, dtype=D)
    m = _trained_eval(_fcn(), x)
    ep = torch.export.export(m, (x,))
    assert _effseg_ops(ep) == []
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "aten.batch_norm.default" in targets and "aten.leaky_relu.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))


def _converted_unet(monai_nets):
    stock = monai_nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                            act=("leakyrelu", {"negative_slope": 0.01}), norm="batch")
    model, report = effseg.convert(stock)
    assert len(report.replaced) == 6
    return stock, model


def test_converted_monai_unet_exports_and_matches_stock(monai_nets):
    stock, model = _converted_unet(monai_nets)
    stock, model = stock.to(D), model.to(D)
    x = torch.randn(1, 1, 16, 16, 16, dtype=D)
    _trained_eval(stock, x)
    model.load_state_dict(stock.state_dict())
    model.eval()
    ep = torch.export.export(model, (x,))
    assert _effseg_ops(ep) == []
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), stock(x))


@pytest.mark.parametrize("which", ["fcn", "monai_unet"])
def test_onnx_export(which, tmp_path, onnx_export, request):
    onnx = onnx_export
    x = torch.randn(1, 1, 16, 16, 16)
    if which == "fcn":
        model = _trained_eval(FullVolumeFCN(channels=(4, 8), strides=(1, 2)), x)
    else:
        stock, model = _converted_unet(request.getfixturevalue("monai_nets"))
        _trained_eval(stock, x)
        model.load_state_dict(stock.state_dict())
        model.eval()
    with torch.no_grad():
        expected = model(x.clone())
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(copy.deepcopy(model), (x,), dynamo=True, verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
