"""Write the embedding fixtures: a tiny random BERT in the sentence-transformers folder
layout with sentence-transformers' embeddings of some texts, and transformers' last-token
embeddings of the tiny qwen3 fixture run left-padded (as Qwen3-Embedding runs).

Run by hand when the fixtures need to change (needs torch, transformers and
sentence-transformers):
    python scripts/make_embedding_fixtures.py
Writes
  tests/fixtures/bert/          config.json, model.safetensors, tokenizer files, modules.json,
                                1_Pooling/config.json, sentence_bert_config.json
  tests/fixtures/embedding/bert_golden.safetensors
      st_embeddings [N, H]      SentenceTransformer(folder).encode(TEXTS) (mean, normalised)
      hidden [B, T, H], tokens [B, T], mask [B, T]   BertModel's last_hidden_state of the
                                first B texts right-padded (for the other pooling modes)
  tests/fixtures/embedding/qwen3_last_token.safetensors
      tokens [B, T], mask [B, T]  left-padded ids (pad 0) of sequences of different lengths
      embeddings [B, H]         L2-normalised last_hidden_state[:, -1] of Qwen3Model
  tests/fixtures/embedding/golden.json  texts and versions
The test suite compares against these without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
BERT = FIX / "bert"
OUT = FIX / "embedding"

WORDS = ("the of and to in is was for on as with by he at from his an it that were which "
         "are this be or first new had its also one not after has two their but who "
         "city season game film world war team river school year time band album song "
         "street line house music water light north south data model vector search").split()
TEXTS = [
    "The river runs north of the city.",
    "a new film was released after the war",
    "Vector search over data",
    "His band had two albums, and one song was first on the list!",
    "school",
    "It was the first season of the team in the new league; they won one game.",
    "zebra quantum xylophone",  # unknown words: [UNK] and character pieces
    "Music, light and water.",
    # longer than max_seq_length (32): sentence-transformers truncates, keeping [SEP]
    "The first team of the city played one game in the season after the war, and the band "
    "had a new song on the album which was also the first music of the school year.",
]


def build_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer (lowercasing BERT normaliser) over WORDS plus single
    characters, saved as transformers saves a BertTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;!?'-"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + \
        ["##" + c for c in chars] + sorted(set(WORDS))
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=64)
    fast.save_pretrained(folder)


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name or "norm.weight" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))


def make_bert() -> dict:
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    BERT.mkdir(parents=True, exist_ok=True)
    build_tokenizer(BERT)
    vocab_size = len(json.loads((BERT / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                     layer_norm_eps=1e-12)
    model = BertModel(cfg, add_pooling_layer=False).float().eval()
    randomize(model, 7)
    model.save_pretrained(BERT, safe_serialization=True)
    (BERT / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], indent=2) + "\n")
    (BERT / "1_Pooling").mkdir(exist_ok=True)
    (BERT / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
    (BERT / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 32, "do_lower_case": False}, indent=2) + "\n")
    for junk in ("vocab.txt",):  # the tokenizer.json is what both sides read
        (BERT / junk).unlink(missing_ok=True)

    st = SentenceTransformer(str(BERT), device="cpu")
    emb = st.encode(TEXTS, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    batch = st.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).last_hidden_state
    save_file({"st_embeddings": emb.astype(np.float32),
               "hidden": hidden.numpy().astype(np.float32),
               "tokens": batch["input_ids"].numpy().astype(np.int64),
               "mask": batch["attention_mask"].numpy().astype(np.int64)},
              str(OUT / "bert_golden.safetensors"))
    import sentence_transformers
    return {"sentence_transformers": sentence_transformers.__version__}


def make_last_token() -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(FIX / "qwen3", torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(11)
    lengths = [5, 12, 1, 9]
    t = max(lengths)
    tokens = torch.zeros((len(lengths), t), dtype=torch.long)
    mask = torch.zeros((len(lengths), t), dtype=torch.long)
    for r, n in enumerate(lengths):
        tokens[r, t - n:] = torch.randint(1, model.config.vocab_size, (n,), generator=gen)
        mask[r, t - n:] = 1
    with torch.no_grad():
        hidden = model(input_ids=tokens, attention_mask=mask).last_hidden_state
    emb = torch.nn.functional.normalize(hidden[:, -1], p=2, dim=-1)
    save_file({"tokens": tokens.numpy().astype(np.int64), "mask": mask.numpy().astype(np.int64),
               "embeddings": emb.numpy().astype(np.float32)},
              str(OUT / "qwen3_last_token.safetensors"))


def main() -> None:
    import transformers

    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = make_bert()
    make_last_token()
    meta.update({"transformers": transformers.__version__, "torch": torch.__version__,
                 "texts": TEXTS})
    (OUT / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {BERT} and {OUT}")


if __name__ == "__main__":
    main()
