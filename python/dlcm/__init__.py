"""dlcm: Dynamic Large Concept Models and LLaMA-style baselines on a C++ engine.

The engine is the C++ library (module dlcm._core); this package is its Python face.
A short tour (docs/python.md has the whole story):

    import dlcm, numpy as np
    model = dlcm.load("runs/dlcm-small")            # a checkpoint or a run folder
    ids = model.tokenizer.encode("The cat sat.")
    logits = model.forward(np.array([ids], np.int32))  # float32 [1, L, V]
    for span in model.concepts("The cat sat."):      # dlcm checkpoints
        print(span["index"], repr(span["text"]), round(span["p"], 3))
    print(model.generate("Once upon a time", max_new_tokens=20, temperature=0))

Errors raise dlcm.Error (or its subclasses ArgumentError, ArgumentTypeError, ClosedError)
with the same one-line messages as the command-line tool.
"""

from ._core import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    Error,
    GenerateStream,
    Model,
    Tokenizer,
    eval,
    load,
    prepare,
    resolve_config,
    train,
)

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ClosedError",
    "Error",
    "GenerateStream",
    "Model",
    "Tokenizer",
    "eval",
    "load",
    "prepare",
    "resolve_config",
    "train",
]
