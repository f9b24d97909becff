"""Structured output: constrain each next token to a JSON schema, a regex or an EBNF grammar.

This package is the bridge to xgrammar (an optional extra: `pip install
"lattice-engine[grammar]"`). It owns
- `GrammarSpec`: what a request asks for, and `grammar_from_request`, the parser of the
  OpenAI-style request fields (`response_format`, `regex`, `grammar`) that the CLI, the
  Python API and the HTTP server share;
- `GrammarCompiler`: xgrammar's view of one model's tokenizer (vocabulary type, added and
  special tokens, the model's vocab size) plus a cache of compiled grammars;
- `GrammarMatcher`: the per-request state; it fills the allowed-token bitmask into a numpy
  int32 buffer, masks a logits row, accepts the sampled token, rolls back;
- batch helpers (`fill_batch_bitmask`, `apply_batch_bitmask`, `accept_batch`) for a
  scheduler that decodes several sequences at once, constrained or not.

No torch tensor is made at run time: xgrammar writes the bitmask into numpy arrays through
DLPack, and the mask is applied with numpy (bit j of int32 word w allows token 32*w + j).
"""

from .compiler import (COMPILED_CACHE_SIZE, UNENFORCED_KEYWORDS, GrammarCompiler,
                       grammar_compiler, xgrammar_message)
from .matcher import (GrammarMatcher, accept_batch, allocate_bitmask, apply_batch_bitmask,
                      apply_bitmask, bitmask_words, fill_batch_bitmask)
from .request import INSTALL_HINT, KINDS, GrammarSpec, grammar_from_request, require_xgrammar
from .vocab import detect_vocab_type, encoded_vocab, tokenizer_parts

__all__ = ["COMPILED_CACHE_SIZE", "INSTALL_HINT", "KINDS", "UNENFORCED_KEYWORDS",
           "GrammarCompiler", "GrammarMatcher", "GrammarSpec", "accept_batch",
           "allocate_bitmask", "apply_batch_bitmask", "apply_bitmask", "bitmask_words",
           "detect_vocab_type", "encoded_vocab", "fill_batch_bitmask", "grammar_compiler",
           "grammar_from_request", "require_xgrammar", "tokenizer_parts", "xgrammar_message"]
