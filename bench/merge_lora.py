"""LoRA inputs and naive references of KnOTS and Core Space for ``bench/merge.py``.

The inputs are ``T`` peft-format adapters (``adapter_config.json`` + ``adapter_model.safetensors``,
written directly, without importing peft) on the LoRA targets of a CLIP ViT-B/32 tower: per block
``attn.in_proj`` (2304 x 768), ``attn.out_proj`` (768 x 768), ``mlp.c_fc`` (3072 x 768) and
``mlp.c_proj`` (768 x 3072), 12 blocks, rank 16, ``lora_alpha`` 32 (scaling 2). ``A`` and ``B`` are
random (a trained ``B`` is nonzero), so every update ``dW_t = s_t B_t A_t`` has full rank ``r``.

The naive references load every adapter (safetensors ``load_file``) and follow the authors' code:

* KnOTS (Stoica et al. 2024, https://arxiv.org/abs/2410.19735; ``task_merger.SVDMerger.apply_svd``
  and ``masking_ops.ties_masking`` of https://github.com/gstoica27/KnOTS): per layer the dense
  ``dW_t``, the dense float64 SVD of ``[dW_1, ..., dW_T]`` (``(m, T n)``) keeping ``s > 1e-5``, task
  representations ``diag(s) V_t``; TIES over all layers' representations of a task at once
  (``kthvalue`` per task, sign of the sum, zero signs to the majority, disjoint mean);
  ``dW = U merged``. The authors cast ``U, s, V`` to float32 after the SVD; here they stay float64
  (a float32 cast moves entries across TIES' threshold and the comparison would measure that).
* Core Space (Panariello et al. 2025, https://arxiv.org/abs/2509.17786;
  ``MatrixPerLayerMerger.get_core_matrices`` and ``_process_ties`` of
  https://github.com/apanariello4/core-space-merging): per layer ``U_B`` / ``V_A`` from the float64
  SVDs of the stacked ``B``'s / ``A``'s, each task's core ``R_B (S_B V_B^T U_A S_A) Q_A`` from the
  SVDs of its own factors (times its scaling), TIES over the layer's cores, ``dW = U_B M V_A^T``.

No asymvlm import here (a subprocess running a reference measures torch + the algorithm only);
asymvlm's own implementation is ``asymvlm.merging.lora_spaces`` (factored: never a dense SVD).

Example:
    >>> import torch
    >>> naive_ties(torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.1]]), density=0.4).tolist()
    [2.0, -2.0, 0.0]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "lora_layer_shapes",
    "prepare_adapters",
    "load_adapters",
    "naive_ties",
    "naive_knots",
    "naive_core_space",
    "run_naive_lora",
    "lora_relative_difference",
]

PREFIX = "base_model.model.transformer.resblocks."
KNOTS_S_MIN = 1e-5  # the authors' kept singular values: s > 1e-5 (absolute)
Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (r, n), B (m, r))


def lora_layer_shapes(width: int = 768, layers: int = 12) -> dict[str, tuple[int, int]]:
    """``{peft layer name: (m, n)}`` of the LoRA targets (``dW`` is ``(m, n)``) of a ViT-B/32 tower."""
    w = width
    targets = {"attn.in_proj": (3 * w, w), "attn.out_proj": (w, w), "mlp.c_fc": (4 * w, w), "mlp.c_proj": (w, 4 * w)}
    return {f"{PREFIX}{i}.{t}": s for i in range(layers) for t, s in targets.items()}


def prepare_adapters(work: Path, tasks: int, width: int, layers: int, rank: int, alpha: float = 32.0) -> None:
    """Write ``work/lora{t}`` (peft's format) for ``t < tasks``: ``A ~ 0.02 N(0, 1)``, ``B ~ 0.01 N(0, 1)``."""
    g = torch.Generator().manual_seed(1)
    shapes = lora_layer_shapes(width, layers)
    for t in range(tasks):
        d = work / f"lora{t}"
        d.mkdir(exist_ok=True)
        state = {}
        for layer, (m, n) in shapes.items():
            state[f"{layer}.lora_A.weight"] = torch.randn(rank, n, generator=g) * 0.02
            state[f"{layer}.lora_B.weight"] = torch.randn(m, rank, generator=g) * 0.01
        save_file(state, d / "adapter_model.safetensors")
        cfg = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": ["in_proj", "out_proj", "c_fc", "c_proj"],
            "use_rslora": False,
        }
        (d / "adapter_config.json").write_text(json.dumps(cfg))


def load_adapters(dirs: list[Path]) -> tuple[list[Layers], list[float]]:
    """Every adapter fully loaded: ``([{layer: (A, B)}], [scaling lora_alpha / r])``."""
    adapters, scalings = [], []
    for d in dirs:
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        state = load_file(str(Path(d) / "adapter_model.safetensors"))
        names = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
        adapters.append({n: (state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"]) for n in names})
        scalings.append(cfg["lora_alpha"] / cfg["r"])
    return adapters, scalings


def naive_ties(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """TIES as the authors' ``ties_masking`` + disjoint mean on ``(T, D)``: per row the
    ``(D - int(D density))``-th smallest ``|x|`` is the threshold (entries ``>=`` it kept), the sign
    of the sum (zeros to the sign of the summed signs), the mean of the agreeing kept entries."""
    d = stacked.shape[1]
    kth = stacked.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    pruned = stacked * (stacked.abs() >= kth)
    sign = torch.sign(pruned.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, pruned > 0, pruned < 0)
    selected = pruned * keep
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


@torch.no_grad()
def naive_knots(adapters: list[Layers], scalings: list[float], density: float) -> dict[str, torch.Tensor]:
    """KnOTS-TIES (module docstring): ``{layer: merged dW (m, n)}`` in float64, lam 1."""
    bases, reps = {}, [[] for _ in adapters]
    for layer in adapters[0]:
        dws = [s * (b.double() @ a.double()) for (a, b), s in ((ad[layer], s) for ad, s in zip(adapters, scalings))]
        n = dws[0].shape[1]
        u, s, v = torch.linalg.svd(torch.cat(dws, 1), full_matrices=False)  # (m, T n): the dense SVD
        u, v, s = u[:, s > KNOTS_S_MIN], v[s > KNOTS_S_MIN], s[s > KNOTS_S_MIN]
        bases[layer] = u
        for t in range(len(adapters)):
            reps[t].append(torch.diag(s) @ v[:, t * n : (t + 1) * n])  # (p, n)
    flat = torch.stack([torch.cat([r.reshape(-1) for r in rs]) for rs in reps])  # (T, D): the model-wide vectors
    merged, out, pos = naive_ties(flat, density), {}, 0
    for layer, rep in zip(bases, reps[0]):
        out[layer] = bases[layer] @ merged[pos : pos + rep.numel()].reshape(rep.shape)
        pos += rep.numel()
    return out


@torch.no_grad()
def naive_core_space(adapters: list[Layers], scalings: list[float], density: float) -> dict[str, torch.Tensor]:
    """Core-Space-TIES (module docstring): ``{layer: merged dW (m, n)}`` in float64, lam 1."""
    out = {}
    for layer in adapters[0]:
        a_list = [ad[layer][0].double() for ad in adapters]
        b_list = [ad[layer][1].double() for ad in adapters]
        vh_a_ref = torch.linalg.svd(torch.cat(a_list, 0), full_matrices=False)[2]  # (T r, n)
        u_b_ref = torch.linalg.svd(torch.cat(b_list, 1), full_matrices=False)[0]  # (m, T r)
        cores = []
        for a, b, s in zip(a_list, b_list, scalings):
            u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
            u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
            core = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)  # (r, r)
            cores.append(s * (u_b_ref.T @ u_b) @ core @ (vh_a @ vh_a_ref.T))  # (T r, T r)
        merged = naive_ties(torch.stack([c.reshape(-1) for c in cores]), density).reshape(cores[0].shape)
        out[layer] = u_b_ref @ merged @ vh_a_ref
    return out


NAIVE_LORA = {"knots": naive_knots, "core_space": naive_core_space}


def run_naive_lora(space: str, dirs: list[Path], out: Path, density: float) -> None:
    """Load every adapter, merge with ``NAIVE_LORA[space]`` and save ``{layer: merged dW}`` (float32)."""
    adapters, scalings = load_adapters(dirs)
    merged = NAIVE_LORA[space](adapters, scalings, density)
    save_file({k: v.float().contiguous() for k, v in merged.items()}, str(out))


def lora_relative_difference(adapter_dir: Path, reference: Path) -> tuple[float, str]:
    """max over layers of max|dW_ours - dW_ref| / max|dW_ref|, ``dW_ours = s B A`` of the written adapter
    (float64 product), and the layer where it is largest."""
    (ours,), (scaling,) = load_adapters([adapter_dir])
    ref = load_file(str(reference))
    worst, where = 0.0, ""
    for layer, (a, b) in ours.items():
        r = ref[layer].double()
        rel = float((scaling * (b.double() @ a.double()) - r).abs().max()) / max(float(r.abs().max()), 1e-30)
        if rel >= worst:
            worst, where = rel, layer
    return worst, where
