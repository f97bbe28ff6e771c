"""Hand-written reference conversions between state_dicts of the ports in ``models.py`` and
transformers' models (the registry's declarative recipes are checked against these).

Every conversion is a rename plus, for some keys, a chain of primitive tensor ops:

GPT-2 (``GPT2LMHeadModel``) <-> nanoGPT
    ``transformer.h.{i}.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}.weight``: HF's
    ``Conv1D`` stores ``[in, out]`` (c_attn ``[D, 3D]``, c_fc ``[D, 4D]``, c_proj ``[4D, D]`` /
    ``[D, D]``), ``nn.Linear`` stores ``[out, in]``: ``transpose(0, 1)`` in both directions.
    Every other key (biases too) is copied under the same name. ``lm_head.weight`` is tied to
    ``transformer.wte.weight`` on both sides; a ``save_pretrained`` checkpoint omits it, so it
    is filled from ``wte``. Old checkpoints' ``.attn.bias``/``.attn.masked_bias`` mask
    buffers are dropped (neither model has them in its state_dict).

timm ``VisionTransformer`` <-> transformers ``ViTForImageClassification``
    ``blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]}``: ``chunk(3, dim=0)`` -> q, k, v
    (timm reshapes the qkv output as (B, N, 3, heads, head_dim): rows ``[q; k; v]``, each
    head-major, as HF's q/k/v projections are; no per-head permutation). Back:
    ``cat([q, k, v], dim=0)``. Everything else is a rename with identical shapes
    (``cls_token`` [1, 1, D], ``pos_embed`` [1, 1 + N, D], conv ``[D, C, P, P]``).
    transformers 5 names the modules (``model.state_dict()``) differently from the
    checkpoint files (``save_pretrained``, the Hub), which it renames on load:

    (``L`` = ``vit.layers.{i}``, ``E`` = ``vit.encoder.layer.{i}``)

    ==========================  ================================================
    timm                        HF module name (state_dict) / checkpoint name
    ==========================  ================================================
    cls_token                   vit.embeddings.cls_token (both)
    pos_embed                   vit.embeddings.position_embeddings (both)
    patch_embed.proj            vit.embeddings.patch_embeddings.projection (both)
    blocks.{i}.norm1            L.layernorm_before / E.layernorm_before
    blocks.{i}.attn.qkv         L.attention.{q,k,v}_proj /
                                E.attention.attention.{query,key,value}
    blocks.{i}.attn.proj        L.attention.o_proj / E.attention.output.dense
    blocks.{i}.norm2            L.layernorm_after / E.layernorm_after
    blocks.{i}.mlp.fc1          L.mlp.fc1 / E.intermediate.dense
    blocks.{i}.mlp.fc2          L.mlp.fc2 / E.output.dense
    norm                        vit.layernorm (both)
    head                        classifier (both)
    ==========================  ================================================

    ``ViTForImageClassification`` has no pooler (``add_pooling_layer=False``) and no
    ``mask_token`` (``use_mask_token=False``), so there are no extra keys.

transformers ``LlamaForCausalLM`` <-> Meta ``llama/model.py``
    Renames: ``model.embed_tokens`` <-> ``tok_embeddings``, ``model.layers.{i}.self_attn.
    {q,k,v,o}_proj`` <-> ``layers.{i}.attention.{wq,wk,wv,wo}``, ``mlp.gate_proj`` <-> ``w1``,
    ``mlp.down_proj`` <-> ``w2``, ``mlp.up_proj`` <-> ``w3``, ``input_layernorm`` <->
    ``attention_norm``, ``post_attention_layernorm`` <-> ``ffn_norm``, ``model.norm`` <->
    ``norm``, ``lm_head`` <-> ``output``. ``rotary_emb.inv_freq`` buffers are dropped.
    wq ``[H * hd, dim]`` and wk ``[KV * hd, dim]`` rows are permuted (wv, wo untouched), with
    ``h`` = n_heads for q, n_kv_heads for k and ``hd = rows // h`` (the head_dim):
    Meta rotates interleaved pairs (row ``2i``, ``2i + 1`` of a head), HF rotates halves (row
    ``i``, ``i + hd/2``); HF row ``h*hd + p*hd/2 + i`` = Meta row ``h*hd + 2i + p``.

    Meta -> HF (``permute`` of ``convert_llama_weights_to_hf.py``):
        ``[h*hd, dim] -reshape-> [h, hd/2, 2, dim] -transpose(1, 2)-> [h, 2, hd/2, dim]
        -reshape-> [h*hd, dim]``
    HF -> Meta (its inverse):
        ``[h*hd, dim] -reshape-> [h, 2, hd/2, dim] -transpose(1, 2)-> [h, hd/2, 2, dim]
        -reshape-> [h*hd, dim]``
    (Equivalently: unflatten dim 0 into (h, hd/2, 2) resp. (h, 2, hd/2), swap dims 1 and 2,
    flatten dims 0..2.) A q/k bias ``[h*hd]`` would take the same chain without ``dim``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- helpers


def _renamer(pairs: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """Map whole keys, or module paths with the parameter name (``weight``/``bias``) carried
    over, ``src -> dst`` (``{}`` stands for a layer index). Unknown keys raise KeyError."""
    table = [
        (re.compile(re.escape(src).replace(r"\{\}", r"(\d+)")), dst.replace("{}", "{0}"))
        for src, dst in pairs
    ]

    def rename(key: str) -> str:
        module, _, param = key.rpartition(".")
        for pattern, dst in table:
            if m := pattern.fullmatch(key):
                return dst.format(*m.groups())
            if module and (m := pattern.fullmatch(module)):
                return f"{dst.format(*m.groups())}.{param}"
        raise KeyError(f"no rename for {key!r}")

    return rename


# --------------------------------------------------------------------------- GPT-2 / nanoGPT

GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _gpt2_transpose(sd: StateDict) -> StateDict:
    out = {
        k: v.t().contiguous() if k.endswith(GPT2_CONV1D) else v
        for k, v in sd.items()
        if not k.endswith(_GPT2_BUFFERS)
    }
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])  # tied
    return out


def hf_gpt2_to_nanogpt(sd: StateDict) -> StateDict:
    return _gpt2_transpose(sd)


def nanogpt_to_hf_gpt2(sd: StateDict) -> StateDict:
    return _gpt2_transpose(sd)


# --------------------------------------------------------------------------- timm ViT / HF ViT

_VIT_SHARED = [
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
    ("norm", "vit.layernorm"),
    ("head", "classifier"),
]
# timm module -> (HF module name, HF checkpoint name); qkv is split separately.
_VIT_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_VIT_QKV = {"module": ("q_proj", "k_proj", "v_proj"), "checkpoint": ("query", "key", "value")}
_QKV_SLOT = {name: j for names in _VIT_QKV.values() for j, name in enumerate(names)}


def _vit_layer(checkpoint_names: bool) -> tuple[str, str]:
    """(HF layer prefix, q/k/v module parent) for one naming scheme."""
    if checkpoint_names:
        return "vit.encoder.layer.{}", "attention.attention"
    return "vit.layers.{}", "attention"


def timm_vit_to_hf_vit(sd: StateDict, checkpoint_names: bool = False) -> StateDict:
    """timm ``VisionTransformer`` -> ``ViTForImageClassification``: module names by default
    (``load_state_dict``), the checkpoint names (``from_pretrained``) if asked."""
    layer, qkv_parent = _vit_layer(checkpoint_names)
    block = {f"blocks.{{}}.{t}": f"{layer}.{h[checkpoint_names]}" for t, h in _VIT_BLOCK.items()}
    rename = _renamer([*_VIT_SHARED, *block.items()])
    qkv_names = _VIT_QKV["checkpoint" if checkpoint_names else "module"]
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            i, param = m.groups()
            for name, part in zip(qkv_names, value.chunk(3, dim=0), strict=True):
                out[f"{layer.format(i)}.{qkv_parent}.{name}.{param}"] = part.contiguous()
        else:
            out[rename(key)] = value
    return out


def hf_vit_to_timm_vit(sd: StateDict) -> StateDict:
    """``ViTForImageClassification`` (module or checkpoint names) -> timm."""
    pairs = [(h, t) for t, h in _VIT_SHARED]
    for checkpoint_names in (False, True):
        layer, _ = _vit_layer(checkpoint_names)
        pairs += [
            (f"{layer}.{h[checkpoint_names]}", f"blocks.{{}}.{t}") for t, h in _VIT_BLOCK.items()
        ]
    rename = _renamer(pairs)
    qkv = re.compile(
        r"vit\.(?:layers|encoder\.layer)\.(\d+)\.attention\.(?:attention\.)?"
        r"(q_proj|k_proj|v_proj|query|key|value)\.(weight|bias)"
    )
    parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: StateDict = {}
    for key, value in sd.items():
        if m := qkv.fullmatch(key):
            i, name, param = m.groups()
            parts.setdefault((i, param), {})[_QKV_SLOT[name]] = value
        else:
            out[rename(key)] = value
    for (i, param), qkv_parts in parts.items():
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([qkv_parts[j] for j in range(3)], dim=0)
    return out


# --------------------------------------------------------------------------- HF Llama / Meta

_LLAMA = [
    ("model.embed_tokens", "tok_embeddings"),
    ("model.layers.{}.self_attn.q_proj", "layers.{}.attention.wq"),
    ("model.layers.{}.self_attn.k_proj", "layers.{}.attention.wk"),
    ("model.layers.{}.self_attn.v_proj", "layers.{}.attention.wv"),
    ("model.layers.{}.self_attn.o_proj", "layers.{}.attention.wo"),
    ("model.layers.{}.mlp.gate_proj", "layers.{}.feed_forward.w1"),
    ("model.layers.{}.mlp.down_proj", "layers.{}.feed_forward.w2"),
    ("model.layers.{}.mlp.up_proj", "layers.{}.feed_forward.w3"),
    ("model.layers.{}.input_layernorm", "layers.{}.attention_norm"),
    ("model.layers.{}.post_attention_layernorm", "layers.{}.ffn_norm"),
    ("model.norm", "norm"),
    ("lm_head", "output"),
]


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved pairs -> halves, per head: ``[h*hd, ...] -> [h, hd/2, 2, ...]
    -transpose(1, 2)-> [h, 2, hd/2, ...] -> [h*hd, ...]``."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Halves -> interleaved pairs, per head: ``[h*hd, ...] -> [h, 2, hd/2, ...]
    -transpose(1, 2)-> [h, hd/2, 2, ...] -> [h*hd, ...]``."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama(
    sd: StateDict,
    rename: Callable[[str], str],
    rotary: Callable[[torch.Tensor, int], torch.Tensor],
    heads: dict[str, int],
) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        h = next((n for suffix, n in heads.items() if key.endswith(suffix)), None)
        out[rename(key)] = value if h is None else rotary(value, h).contiguous()
    return out


def hf_llama_to_meta(sd: StateDict, n_heads: int, n_kv_heads: int) -> StateDict:
    heads = {"self_attn.q_proj.weight": n_heads, "self_attn.k_proj.weight": n_kv_heads}
    return _llama(sd, _renamer(_LLAMA), hf_to_meta_rotary, heads)


def meta_to_hf_llama(sd: StateDict, n_heads: int, n_kv_heads: int) -> StateDict:
    heads = {"attention.wq.weight": n_heads, "attention.wk.weight": n_kv_heads}
    return _llama(sd, _renamer((m, h) for h, m in _LLAMA), meta_to_hf_rotary, heads)
