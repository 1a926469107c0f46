"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py + llama-quantize write them, with the gguf package's writer.

What the converter does to a Hugging Face checkpoint, redone here so that the audit's reading is tested against
files it did not write itself: each tensor renamed with gguf-py's table (``get_tensor_name_map``), a layer's
routed experts stacked into one [E, out, in] tensor (``torch.stack(dim=0)``), ``e_score_correction_bias`` renamed
``e_score_correction.bias``, and for llama-style architectures the q/k rows permuted for rotary pairs
(``LlamaModel.permute``: reshape(heads, 2, rows / heads / 2, in).swapaxes(1, 2)). Then the quantizer's choices:
1-D tensors and the router stay F32, every other tensor gets the file's type (``tensor_types`` overrides by GGUF
name), or F16 where its rows are not whole blocks of that type (llama-quantize's fallback).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from audit.model.directory import ModelDir
from audit.model.gguf_file import GGUF_ARCH, UNPERMUTE_ARCHS, gguf_names
from audit.model.gguf_quant import BY_NAME, quantize_rows


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, out: Path, qtype: str = "Q8_0", tensor_types: dict[str, str] | None = None,
               override: dict[str, torch.Tensor] | None = None, arch: str | None = None, skip_unnamed: bool = False,
               extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Convert ``model_dir`` (a safetensors model) to a GGUF file ``out`` of type ``qtype``; ``override``: base keys whose
    values come from these tensors instead (e.g. the base's, for a conversion that dropped an edit); ``skip_unnamed``: leave
    out the tensors gguf's table has no name for (else an error); ``extra``: GGUF tensors to add as they are (F32)."""
    import gguf

    md = ModelDir(model_dir)
    cfg = md.config
    lay = md.layout
    arch = arch or GGUF_ARCH[lay.family]
    names, unnamed = gguf_names(arch, lay.num_layers, md.logical)
    assert skip_unnamed or not unnamed, unnamed
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(md.path.name)
    w.add_block_count(lay.num_layers)
    w.add_embedding_length(lay.hidden_size)
    w.add_context_length(int(cfg.get("max_position_embeddings", 128)))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    if lay.n_routed_experts:
        w.add_expert_count(lay.n_routed_experts)
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    tensors: list[tuple[str, torch.Tensor, str]] = []
    for key, t in md.iter_tensors():
        if key not in names:
            continue
        t = (override or {}).get(key, t).float()
        gname, expert, ttype = names[key]
        if expert is not None:
            stacks.setdefault(gname, {})[expert] = t
            if len(stacks[gname]) == lay.n_routed_experts:
                tensors.append((gname, torch.stack([stacks[gname][e] for e in range(lay.n_routed_experts)]), ttype))
            continue
        if arch in UNPERMUTE_ARCHS and ttype in ("ATTN_Q", "ATTN_K"):
            heads = int(cfg["num_attention_heads"] if ttype == "ATTN_Q" else cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
            t = _permute(t, heads)
        tensors.append((gname, t, ttype))
    tensors += [(n, t, "EXTRA") for n, t in (extra or {}).items()]
    for gname, t, ttype in tensors:
        kind = BY_NAME[(tensor_types or {}).get(gname, qtype)]
        if t.ndim == 1 or ttype in ("FFN_GATE_INP", "FFN_EXP_PROBS_B"):
            kind = BY_NAME["F32"]
        elif t.shape[-1] % kind.block:
            kind = BY_NAME["F16"]
        rows = t.reshape(-1, t.shape[-1])
        data = quantize_rows(kind, rows).reshape(*t.shape[:-1], -1).numpy()
        if kind.name == "F32":
            w.add_tensor(gname, data.view(np.float32).reshape(t.shape))
        elif kind.name == "F16":
            w.add_tensor(gname, data.view(np.float16).reshape(t.shape))
        else:
            w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType(kind.id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md.close()
    return out


def widen_glm(model_dir, out: Path, width: int = 256) -> Path:
    """The glm4_moe organism zero-padded to ``width`` (hidden size, head_dim x heads, every intermediate size): the same model
    (every padded value 0, norms halved with eps / 4 so RMS norms over ``width`` equal those over the true width, q doubled
    for the larger head_dim's attention scale, rotary still on the first 8 dims of each head), but with rows of 256 values,
    which the K-quants need (a 64-wide model has none). Its logits equal the original's to float rounding (tested)."""
    import json
    import shutil

    from audit.model.shards import write_shard

    md = ModelDir(model_dir)
    cfg = dict(md.config)
    H, hd, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    new_hd = width // nh
    f = width // H  # the norms' rescaling: mean(x^2) over width is 1/f of the true one
    assert width % H == 0 and new_hd >= hd and width >= cfg["intermediate_size"] and width >= cfg["moe_intermediate_size"]

    def heads(t, n, axis):  # spread n heads of hd along ``axis`` to n heads of new_hd (zeros after each)
        shape = list(t.shape)
        shape[axis] = n * new_hd
        o = t.new_zeros(shape)
        for h in range(n):
            src = t.narrow(axis, h * hd, hd)
            o.narrow(axis, h * new_hd, hd).copy_(src)
        return o

    def pad(t, sizes):
        o = t.new_zeros(sizes)
        o[tuple(slice(0, s) for s in t.shape)] = t
        return o

    tensors = []
    for key, t in md.iter_tensors():
        if key.endswith("norm.weight"):
            t = pad(t * (1.0 / f ** 0.5), (width,))
        elif key.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = pad(t, (t.shape[0], width))
        elif "self_attn" in key:
            proj = key.split(".")[-2]
            if proj in ("q_proj", "k_proj", "v_proj"):
                t = pad(heads(t, nh if proj == "q_proj" else nkv, 0), (nh * new_hd if proj == "q_proj" else nkv * new_hd, width))
                if proj == "q_proj":
                    t = t * (new_hd / hd) ** 0.5
            else:  # o_proj [H, heads * hd]
                t = pad(heads(t, nh, 1), (width, nh * new_hd))
        elif key.endswith(("gate_proj.weight", "up_proj.weight")):
            t = pad(t, (width, width))
        elif key.endswith("down_proj.weight"):
            t = pad(t, (width, width))
        elif key.endswith("mlp.gate.weight"):
            t = pad(t, (t.shape[0], width))
        tensors.append((key, t.contiguous()))
    out = Path(out)
    out.mkdir(parents=True)
    write_shard(out / "model.safetensors", tensors, {"format": "pt"})
    for p in md.path.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", "ablation-manifest.json"):
            shutil.copy2(p, out / p.name)
        elif p.is_dir() and p.name == "prompts":
            shutil.copytree(p, out / "prompts")
    rope = dict(cfg.get("rope_parameters") or {})
    rope["partial_rotary_factor"] = rope.get("partial_rotary_factor", 0.5) * hd / new_hd
    cfg.update(hidden_size=width, head_dim=new_hd, intermediate_size=width, moe_intermediate_size=width, rms_norm_eps=cfg["rms_norm_eps"] / f,
               rope_parameters=rope)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    md.close()
    return out
