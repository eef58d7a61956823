"""Language-model distillation: Llama-style students and teachers (`models`), KV-cached sampling
(`sampling`), tokenizers and packed text data (`tokenizer`, `data`), the fused LM step (`step`)
and its training loop and evaluation (`trainer`), the teacher cache of top-k targets (`cache`,
`kdjax cache-teacher`). The token losses are in kdjax.losses.token;
text preparation is `kdjax prepare text` (kdjax.prepare.text)."""
