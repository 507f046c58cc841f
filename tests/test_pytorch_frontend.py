"""--fmk=PYTORCH: a TorchScript file is exported to ONNX and quantized like any ONNX model (needs torch)."""

import numpy as np
import pytest
from helpers import cosine, run

from ptqlite import convert, parse_config
from ptqlite.errors import UsageError
from ptqlite.model import load_model


def test_torchscript_is_exported_and_quantized(tmp_path):
    torch = pytest.importorskip("torch", reason="--fmk=PYTORCH needs the optional torch extra")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 3)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    path = tmp_path / "net.pt"
    net = Net().eval()
    torch.jit.trace(net, torch.zeros(1, 3, 16, 16)).save(str(path))
    model = load_model(path, "PYTORCH", {"x": [1, 3, 16, 16]})
    assert [i.name for i in model.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)
    config = parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_channel=0\n")
    result = convert(model, config)
    assert len(result.quantized) == 2
    assert cosine(run(result.model, {"x": x})[0], expected) > 0.999


def test_pytorch_needs_input_shapes(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"not used")
    with pytest.raises(UsageError, match="inputShape|torch"):
        load_model(path, "PYTORCH", None)
