"""The README's Python example runs as written against a real server, prints what its
comments say, and its gradients are torch's."""

import contextlib
import copy
import io
import re
from pathlib import Path

import torch

from tests.oracle import TOLERANCE

README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_the_readme_python_example_runs_and_prints_what_it_says(server):
    code = python_example()
    assert DEFAULT_ADDRESS in code
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(DEFAULT_ADDRESS, server.address), "README.md", "exec"), scope)
    lines = printed.getvalue().splitlines()
    # each print's comment starts with what it prints
    comments = [line.split("#")[1].split(":")[0].strip() for line in code.splitlines()
                if line.startswith("print(")]  # fmt: skip
    assert lines == comments
    # and the gradients are float64 autograd's, to float32's tolerance
    nets, x, y, result = scope["nets"], scope["x"], scope["y"], scope["result"]
    for k in (0, len(nets) - 1):
        net = copy.deepcopy(nets[k]).double()
        torch.nn.functional.mse_loss(net(x.double()), y.double()).backward()
        for name, parameter in net.named_parameters():
            got = torch.as_tensor(result.gradients[k][name]).double()
            assert (got - parameter.grad).norm() <= TOLERANCE["float32"] * parameter.grad.norm()
