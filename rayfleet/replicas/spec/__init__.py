"""Draft-model speculative decoding.

- ``proposer``: the draft model, its paged KV cache (sharing the target's block table) and
  batched proposals;
- ``rejection``: verification of k drafts against the target's k + 1 rows of logits, keeping the
  target's distribution exactly;
- ``adaptive``: per-request draft counts from observed acceptance and a measured cost model that
  turns speculation off when it would not pay (pure Python).

Importing this package imports no torch; the submodules ``proposer`` and ``rejection`` do.
"""
