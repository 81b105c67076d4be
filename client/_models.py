"""The forms a caller may give an ensemble in, and the way back to the same form.

Accepted: an `nn.Sequential` of Linear + activation modules (M = 1; a lone `nn.Linear` is a
one-layer network), a list of them (same architecture), or a dict of stacked parameters:
gradserve's own `layers.{i}.weight` [M, ...] names or a `torch.func.stack_module_state` dict
of a Sequential (`0.weight`, `2.weight`, ...; with named or nested modules, `hidden.weight`,
`out.weight`, the layers in the order of the keys, which is the modules' order). A layer
without a bias (nn.Linear(..., bias=False), or no bias key in a dict) is sent without one
(Architecture.layers_without_bias).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve.client._tensors import is_torch, with_values

_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<kind>weight|bias)$")


@dataclass
class Ensemble:
    """Parameters in gradserve's layout, plus how to hand gradients back."""

    params: dict[str, Any]  # "layers.{i}.weight" -> [M, d_out, d_in], "layers.{i}.bias"
    layer_sizes: list[int]
    hidden_activation: tuple[str, float] | None  # inferred from modules, else None
    output_activation: tuple[str, float] | None
    form: str  # "sequential" | "sequential_list" | "dict"
    original_keys: dict[str, str]  # gradserve name -> caller's key
    as_torch: bool
    layers_without_bias: tuple[int, ...] = ()  # nn.Linear(..., bias=False): no bias sent

    def per_model(self, value: Any) -> Any:
        """A result with a leading model axis in the caller's form: a single nn.Sequential's
        without it, as torch gives them for one network (its loss a scalar, its outputs
        [N, dL] like net(x), its input gradients like x.grad); None stays None."""
        return value[0] if self.form == "sequential" and value is not None else value

    def gradients_back(self, grads: dict[str, Any]) -> Any:
        """{"layers.0.weight.grad": [M, ...]} -> the caller's form, keys and kind."""
        named = {self.original_keys[k]: v for k, v in grads.items()}
        if self.form == "dict":
            return named
        if self.form == "sequential":
            return {k: v[0] for k, v in named.items()}
        m = next(iter(named.values())).shape[0]
        return [{k: v[i] for k, v in named.items()} for i in range(m)]

    def parameters_back(self, params: dict[str, Any]) -> Any:
        """{"layers.0.weight": [M, ...]} (updated parameters) -> the caller's form."""
        return self.gradients_back({f"{k}.grad": v for k, v in params.items()})


def _activation_of(module) -> tuple[str, float] | None:
    """Activation name (and leaky_relu slope) of a torch module; None if not one."""
    from torch import nn

    simple = {
        nn.ReLU: "relu",
        nn.Tanh: "tanh",
        nn.Sigmoid: "sigmoid",
        nn.SiLU: "silu",
    }
    for cls, name in simple.items():
        if type(module) is cls:
            return name, 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.GELU:
        if module.approximate != "none":
            raise ValueError("only exact GELU (approximate='none') is supported")
        return "gelu", 0.01
    if type(module) is nn.Softplus:
        if module.beta != 1 or module.threshold != 20:
            raise ValueError("only Softplus(beta=1, threshold=20) is supported")
        return "softplus", 0.01
    return None


def _flattened(seq) -> list:
    """The modules of a Sequential, those of Sequentials nested in it in their place (a
    network built from blocks)."""
    from torch import nn

    modules = []
    for module in seq:
        modules += _flattened(module) if type(module) is nn.Sequential else [module]
    return modules


def _check_plain_linear(lin) -> None:
    """A Linear computes x @ W.T + b with W and b its own parameters, or it is refused:
    a subclass with its own forward() (a scaled or low-rank adapter), or weights computed
    from other parameters (weight_norm, spectral_norm, any parametrization) would be sent
    as a plain Linear, and their gradients come back wrong or not at all."""
    from torch import nn

    name = type(lin).__name__
    if type(lin).forward is not nn.Linear.forward:
        raise ValueError(f"{name} has a forward() of its own; only nn.Linear's is supported")
    own = dict(lin.named_parameters(recurse=False))
    plain = (
        own.get("weight") is lin.weight
        and (lin.bias is None or own.get("bias") is lin.bias)
        and not set(own) - {"weight", "bias"}
        and not any(True for _ in lin.children())
    )
    if not plain:
        raise ValueError(
            f"{name}'s weight is computed from other parameters (weight_norm, spectral_norm, a "
            "parametrization); only a Linear's own weight and bias are supported"
        )
    if isinstance(lin.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{name} has no parameters until it has run once")


def _sequential_structure(seq) -> tuple[list, tuple | None, tuple | None]:
    """Linear modules, hidden activation, output activation of an nn.Sequential (or of a
    lone nn.Linear: a one-layer network)."""
    from torch import nn

    linears, acts_after = [], []
    for module in [seq] if isinstance(seq, nn.Linear) else _flattened(seq):
        if type(module) is nn.Identity:  # computes nothing, wherever it stands
            continue
        if isinstance(module, nn.Linear):
            _check_plain_linear(module)
            linears.append(module)
            acts_after.append(None)
            continue
        act = _activation_of(module)
        if act is None:
            raise ValueError(f"unsupported module in Sequential: {type(module).__name__}")
        if not linears or acts_after[-1] is not None:
            raise ValueError("each activation must follow a Linear layer")
        acts_after[-1] = act
    if not linears:
        raise ValueError("the Sequential has no Linear layer")
    # A layer's gradient is what comes back under its parameters' names; a parameter in
    # two layers (a Linear used twice, tied weights) would get one use's gradient, not the
    # sum over its uses that torch computes, and train as two copies.
    params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
    if len({id(p) for p in params}) < len(params):
        raise ValueError(
            "a parameter is used by more than one Linear layer (a Linear used twice, or tied "
            "weights); each layer needs its own parameters"
        )
    hidden = {a or ("identity", 0.01) for a in acts_after[:-1]}
    if len(hidden) > 1:
        raise ValueError(f"all hidden activations must be the same, got {sorted(hidden)}")
    return linears, (hidden.pop() if hidden else None), acts_after[-1] or ("identity", 0.01)


def _from_sequentials(seqs: list, form: str) -> Ensemble:
    import torch

    structures = [_sequential_structure(s) for s in seqs]
    linears, hidden, output = structures[0]

    def architecture(linears):
        sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
        return sizes, tuple(i for i, lin in enumerate(linears) if lin.bias is None)

    sizes, without_bias = architecture(linears)
    for other, h, o in structures[1:]:
        if architecture(other) != (sizes, without_bias) or h != hidden or o != output:
            raise ValueError("every Sequential of an ensemble must have the same architecture")
    names = {id(p): n for n, p in seqs[0].named_parameters()}
    params, keys = {}, {}
    for i, lin in enumerate(linears):
        for kind in ("weight", "bias") if i not in without_bias else ("weight",):
            params[f"layers.{i}.{kind}"] = as_array(
                torch.stack([getattr(st[0][i], kind).detach() for st in structures]),
                names[id(getattr(lin, kind))],
            )
            keys[f"layers.{i}.{kind}.grad"] = names[id(getattr(lin, kind))]
    return Ensemble(params, sizes, hidden, output, form, keys, True, without_bias)


def _from_dict(state: dict) -> Ensemble:
    layers = _indexed_layers(state)
    if layers is None:
        layers = _layers_in_order(state)
    params, keys, without_bias = {}, {}, []
    for i, index in enumerate(sorted(layers)):
        if "weight" not in layers[index]:
            raise ValueError(f"layer {layers[index]['bias'][0]!r} has a bias but no weight")
        if "bias" not in layers[index]:
            without_bias.append(i)  # as nn.Linear(..., bias=False)
        for kind, (key, value) in layers[index].items():
            params[f"layers.{i}.{kind}"] = as_array(value, key)
            keys[f"layers.{i}.{kind}.grad"] = key
        weight_key, weight = layers[index]["weight"][0], params[f"layers.{i}.weight"]
        if len(weight.shape) != 3:
            raise ValueError(
                f"{weight_key}: stacked weights must be [M, d_out, d_in], got shape "
                f"{list(weight.shape)}"
            )
    weights = [params[f"layers.{i}.weight"] for i in range(len(layers))]
    sizes = [int(weights[0].shape[2])] + [int(w.shape[1]) for w in weights]
    as_torch = any(is_torch(v) for v in params.values())
    return Ensemble(params, sizes, None, None, "dict", keys, as_torch, tuple(without_bias))


def _indexed_layers(state: dict) -> dict[int, dict[str, tuple[str, Any]]] | None:
    """{layer index: {"weight"|"bias": (key, value)}} where every key is one prefix, a layer
    index and the kind (`layers.0.weight`; a Sequential's `0.weight`, `2.weight`), else
    None."""
    layers: dict[int, dict[str, tuple[str, Any]]] = {}
    prefixes = set()
    for key in state:
        match = _KEY.match(key)
        if not match:
            return None
        prefixes.add(match["prefix"])
        layers.setdefault(int(match["index"]), {})[match["kind"]] = (key, state[key])
    return layers if len(prefixes) == 1 else None


def _layers_in_order(state: dict) -> dict[int, dict[str, tuple[str, Any]]]:
    """Layers by module name in the order the keys first name them, as stack_module_state
    gives a Sequential's with named modules (`hidden.weight`, `out.weight`: module order)."""
    layers: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if not module or kind not in ("weight", "bias"):
            raise ValueError(
                f"parameter key {key!r} is not '<module>.weight' or '<module>.bias' "
                "(layers.{i}.weight, or a Sequential's stack_module_state keys)"
            )
        layers.setdefault(module, {})[kind] = (key, value)
    return dict(enumerate(layers.values()))


def _is_network(x: Any) -> bool:
    """An nn.Sequential or nn.Linear itself: a subclass may compute something else in its
    own forward(), which the modules it holds would not show."""
    return is_torch(x) and type(x).__name__ in ("Sequential", "Linear")


def normalize(model: Any) -> Ensemble:
    if isinstance(model, dict):
        if not model:
            raise ValueError("the parameter dict is empty")
        return _from_dict(model)
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("the list of models is empty")
        odd = next((m for m in model if not _is_network(m)), None)
        if odd is None:
            return _from_sequentials(list(model), "sequential_list")
        # A list of dicts is what training returns for a list of Sequentials: parameters
        # without the activations, which only the modules know.
        hint = (
            "; to continue from a result's parameters, load them into the models "
            "(model.load_state_dict(result.parameters[k])) and pass the models"
            if isinstance(odd, dict)
            else ""
        )
        raise TypeError(
            "a list of models must hold nn.Sequential (or nn.Linear) modules "
            f"(got {type(odd).__name__}){hint}"
        )
    if _is_network(model):
        return _from_sequentials([model], "sequential")
    raise TypeError(
        "model must be an nn.Sequential (or nn.Linear), a list of them, or a dict of stacked "
        f"parameters (got {type(model).__name__})"
    )


def as_array(x: Any, name: str) -> Any:
    """Leave numpy arrays and (dense) torch tensors alone; make sparse torch tensors dense
    and refuse ones on the meta device (with_values), and masked arrays with masked
    entries; turn lists into numpy arrays (a list of rows of different lengths is refused,
    naming the tensor, not in numpy's words)."""
    if is_torch(x):
        return with_values(x, name)
    if isinstance(x, np.ma.MaskedArray):
        if np.ma.getmaskarray(x).any():  # numpy would send what the masked entries hold
            raise TypeError(f"{name}: a masked array with masked entries; fill them "
                            "(.filled(value)) or leave those samples out")  # fmt: skip
        return x.data
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except ValueError:
        raise ValueError(f"{name}: its rows differ in shape (a ragged list)") from None
