"""An independent float32 torch reference of Qwen3.5's MTP head on the tiny qwen3_5_vl
fixture (which carries an `mtp.*` head), committed as its mtp_reference.safetensors.

    python scripts/make_qwen3_5_mtp_fixture.py

Written from vLLM's structure (`vllm/model_executor/models/qwen3_5_mtp.py`,
`Qwen3_5MultiTokenPredictor.forward`; transformers has no MTP module), not from lattice's
code: e = pre_fc_norm_embedding(embed(x_{t+1})), h = pre_fc_norm_hidden(h_t),
y = fc(cat(e, h)), one gated full-attention decoder layer (Qwen3.5's: q_proj yields a
per-head sigmoid gate, q/k RMSNorm, partial rotary), mtp.norm, the shared lm_head.
Norms scale by (1 + w). Rows pair hidden h_t (here random, standing for the target's
final-norm states) with token x_{t+1} at rotary position t.

Writes:
  hidden [T, H], next_ids [T], positions [T]   the rows (T = 7, positions 3 .. 9)
  logits [T, V]                                 the head's logits for them (causal)
  chain_ids [3], chain_logits [3, V]            three chained steps after the last row:
      greedy token from the previous logits, the previous output state as h, position + 1
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen3_5_vl"


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Reference:
    def __init__(self, cfg: dict, weights: dict[str, np.ndarray], head: str, embed: str):
        self.c = cfg
        self.w = {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()
                  if k.startswith("mtp.")}
        self.embed = torch.from_numpy(weights[embed].astype(np.float32))
        self.head = torch.from_numpy(weights[head].astype(np.float32))
        rope = cfg["rope_parameters"]
        self.rd = int(cfg["head_dim"] * rope["partial_rotary_factor"])
        self.inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, self.rd, 2,
                                                                  dtype=torch.float64) / self.rd))
        self.keys, self.values, self.pos = [], [], []  # the layer's cache, row by row

    def rope(self, x, pos):  # x [T, heads, d]
        freqs = pos[:, None].double() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1).float()
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        r, p = x[..., :self.rd], x[..., self.rd:]
        return torch.cat([r * cos + rotate_half(r) * sin, p], -1)

    def rows(self, ids, hidden, pos):
        """Output states [T, H] (after mtp.norm) of rows appended to the cache."""
        c, w, eps = self.c, self.w, self.c["rms_norm_eps"]
        d, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        e = rms(self.embed[ids], w["mtp.pre_fc_norm_embedding.weight"], eps)
        h = rms(hidden, w["mtp.pre_fc_norm_hidden.weight"], eps)
        x = torch.cat([e, h], -1) @ w["mtp.fc.weight"].T
        p = "mtp.layers.0"
        n = rms(x, w[f"{p}.input_layernorm.weight"], eps)
        t = x.shape[0]
        qg = (n @ w[f"{p}.self_attn.q_proj.weight"].T).view(t, nq, 2 * d)
        q, gate = qg[..., :d], qg[..., d:]
        k = (n @ w[f"{p}.self_attn.k_proj.weight"].T).view(t, nkv, d)
        v = (n @ w[f"{p}.self_attn.v_proj.weight"].T).view(t, nkv, d)
        q = self.rope(rms(q, w[f"{p}.self_attn.q_norm.weight"], eps), pos)
        k = self.rope(rms(k, w[f"{p}.self_attn.k_norm.weight"], eps), pos)
        start = sum(a.shape[0] for a in self.keys)
        self.keys.append(k)
        self.values.append(v)
        K, V = torch.cat(self.keys), torch.cat(self.values)  # [S, nkv, d]
        rep = nq // nkv
        K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
        scores = torch.einsum("thd,shd->hts", q, K) / d ** 0.5
        s = K.shape[0]
        mask = torch.arange(s)[None, :] > (start + torch.arange(t))[:, None]
        scores = scores.masked_fill(mask[None], float("-inf"))
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), V)
        attn = (attn * torch.sigmoid(gate)).reshape(t, nq * d)
        h1 = x + attn @ w[f"{p}.self_attn.o_proj.weight"].T
        m = rms(h1, w[f"{p}.post_attention_layernorm.weight"], eps)
        act = torch.nn.functional.silu(m @ w[f"{p}.mlp.gate_proj.weight"].T) * \
            (m @ w[f"{p}.mlp.up_proj.weight"].T)
        y = h1 + act @ w[f"{p}.mlp.down_proj.weight"].T
        return rms(y, w["mtp.norm.weight"], eps)

    def logits(self, states):
        return states @ self.head.T


def main() -> None:
    torch.manual_seed(0)
    raw = json.loads((FIXTURE / "config.json").read_text())
    cfg = raw.get("text_config", raw)
    weights = load_file(str(FIXTURE / "model.safetensors"))
    prefix = "model.language_model" if "text_config" in raw else "model"
    embed = f"{prefix}.embed_tokens.weight"
    head = embed if raw.get("tie_word_embeddings", False) or "lm_head.weight" not in weights \
        else "lm_head.weight"
    ref = Reference(cfg, weights, head, embed)
    gen = torch.Generator().manual_seed(3)
    t, hsize, vocab = 7, cfg["hidden_size"], cfg["vocab_size"]
    hidden = torch.randn(t, hsize, generator=gen)
    next_ids = torch.randint(0, vocab, (t,), generator=gen)
    positions = torch.arange(3, 3 + t)
    with torch.no_grad():
        states = ref.rows(next_ids, hidden, positions)
        logits = ref.logits(states)
        chain_ids, chain_logits = [], []
        last_state, last_logits, pos = states[-1:], logits[-1:], int(positions[-1])
        for _ in range(3):
            tok = last_logits.argmax(-1)
            pos += 1
            last_state = ref.rows(tok, last_state, torch.tensor([pos]))
            last_logits = ref.logits(last_state)
            chain_ids.append(tok)
            chain_logits.append(last_logits)
    out = {"hidden": hidden.numpy(), "next_ids": next_ids.numpy().astype(np.int64),
           "positions": positions.numpy().astype(np.int64), "logits": logits.numpy(),
           "chain_ids": torch.cat(chain_ids).numpy().astype(np.int64),
           "chain_logits": torch.cat(chain_logits).numpy()}
    path = FIXTURE / "mtp_reference.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    print(f"wrote {path}: logits {out['logits'].shape}, chain {out['chain_ids'].tolist()}")


if __name__ == "__main__":
    main()
