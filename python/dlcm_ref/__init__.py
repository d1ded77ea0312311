"""PyTorch reference implementation of the dlcm models (SPEC sections 2-4, 6, 9)."""
import json
import os
import sys

import numpy as np
import torch

from .config import Config, config_from_dict, load_config  # noqa: F401
from .model import (baseline_forward, default_targets, dlcm_forward, forward,  # noqa: F401
                    mup_group, param_specs, unused_specs)
from .safetensors_io import read_safetensors, write_safetensors  # noqa: F401


def load_checkpoint(ckpt_dir, dtype=torch.float32):
    """Returns (cfg, params) with params an ordered dict name -> tensor (SPEC-9 names). Tensors
    of unused_specs(cfg) (the concept path under concept_path = false) are loaded when present:
    they are parameters without gradient (reference.py writes zero gradients for them)."""
    cfg = load_config(os.path.join(ckpt_dir, "config.json"))
    path = os.path.join(ckpt_dir, "model.safetensors")
    tensors, _ = read_safetensors(path)
    params = {}
    for name, shape, _ in param_specs(cfg):
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor '{name}'")
        a = tensors[name]
        if list(a.shape) != list(shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {list(a.shape)}, expected {shape}")
        params[name] = torch.tensor(np.asarray(a, dtype=np.float32), dtype=dtype)
    for name, shape, _ in unused_specs(cfg):
        if name in tensors:
            if list(tensors[name].shape) != list(shape):
                raise ValueError(f"{path}: tensor '{name}' has shape {list(tensors[name].shape)}, "
                                 f"expected {shape}")
            params[name] = torch.tensor(np.asarray(tensors[name], dtype=np.float32), dtype=dtype)
    extra = set(tensors) - set(params)
    if extra:
        print(f"{path}: warning: ignoring unexpected tensors {sorted(extra)}", file=sys.stderr)
    return cfg, params


def init_params(cfg, seed=0, std=None, norm_jitter=0.0, identity_jitter=0.0):
    """Random parameters for fixtures/tests (not the engine's init): matrices, embeddings and
    vectors ~ N(0, std); norms = 1 (+ jitter); router projections = I (+ jitter)."""
    g = torch.Generator().manual_seed(seed)
    std = cfg.init_std if std is None else std
    params = {}
    for name, shape, kind in param_specs(cfg):
        if kind == "norm":
            t = torch.ones(shape) + norm_jitter * torch.randn(shape, generator=g)
        elif kind == "identity":
            t = torch.eye(shape[0], shape[1]) + identity_jitter * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        params[name] = t.to(torch.float32)
    return params


def save_checkpoint(ckpt_dir, cfg_dict, params):
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    write_safetensors(os.path.join(ckpt_dir, "model.safetensors"),
                      {k: v.detach().cpu().numpy() for k, v in params.items()})


def read_rows(path):
    """Text file: one row per line, integers separated by whitespace; all rows the same length."""
    rows = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows.append([int(v) for v in line.split()])
    if not rows:
        raise ValueError(f"{path}: no rows")
    L = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != L:
            raise ValueError(f"{path}: row {i + 1} has {len(r)} values, expected {L}")
    return torch.tensor(rows, dtype=torch.int64)


def write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(" ".join(str(int(v)) for v in r) + "\n")
