"""Regional ``torch.compile`` of the base model's decoder layers (``train.compile``).

Each decoder layer of the shared base is compiled in place (``nn.Module.compile``): the layers share one
class, so Dynamo traces one layer's code and reuses it for the others (regional compilation: far less
compile time than the whole model, and the parts lmas runs outside the layers, such as the LM head at
the answer positions only and the shared trunk's split between frozen and adapted layers, stay as
they are). The LoRA modules inside a layer are traced with it; switching the active adapter or
meeting a new sequence length recompiles (Dynamo marks lengths dynamic after the second one).
Parameters and state-dict keys are unchanged, so checkpoints and adapters load as before.

Measured effect: ``benchmarks/compile.py`` (CPU) and ``benchmarks/gpu.py`` (CUDA).
"""

from __future__ import annotations

from torch import nn

from lmas.lm.likelihood import causal_lm


def compile_layers(model: nn.Module, mode: str | None = None) -> int:
    """Compile every decoder layer of ``model`` (an HF or peft causal LM) in place; returns how many.

    ``mode``: ``torch.compile``'s mode (None: its default). Raises ``ValueError`` naming
    ``train.compile`` when the model has no list of decoder layers (``<body>.layers``).
    """
    base = causal_lm(model)
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"train.compile=true: {type(base).__name__} has no decoder layers (a non-empty ModuleList `layers`) "
            "to compile; set train.compile=false"
        )
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)
