"""Structured outputs: constrained decoding with xgrammar.

The pieces, in the order a request meets them:
  params.py          StructuredOutputsParams: what a request asks for (a JSON schema, any JSON object, a regex,
                     a choice among strings, an EBNF grammar); plain data, part of SamplingParams
  schema_support.py  JSON-schema keywords xgrammar would silently not enforce (refused, so the shape holds)
  vocabulary.py      the token table xgrammar needs, built from the tokenizer (input processing's side)
  compiler.py        GrammarCompiler: compiles off the engine loop, once per constraint (bounded LRU)
  grammar.py         Grammar (what the core gets) and GrammarMatcher (one per choice, fed every token)
  bitmask.py         the allowed-token bitmask applied to the constrained rows of a step's logits

xgrammar is imported only when a structured request comes.
"""
