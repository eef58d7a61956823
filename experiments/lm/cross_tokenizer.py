"""A BPE student distilled from the byte-level demo teacher (teacher.py), across tokenizers:
both tokenizations of each row aligned by byte offsets, and the two models compared on their
next-byte distributions (lm.cross_tokenizer='next_byte', kdjax.lm.cross_tokenizer).

The student's data is the demo corpus in a 512-token byte-level BPE, 64 tokens a row (about as
many bytes a row as the teacher's 128, so both students see the same text per step):

  kdjax prepare text --name pystdlib_bpe --tokenizer bpe --vocab-size 512 --seq-len 64 \
      --data-dir data/text --from "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"/*.py
  kdjax train   --config experiments/lm/cross_tokenizer.py:scratch --workdir workdirs/lm/bpe_scratch
  kdjax distill --config experiments/lm/cross_tokenizer.py:kd --workdir workdirs/lm/bpe_kd \
      --config.teacher.workdir=workdirs/lm/teacher

Same budget for both (student_scratch.py's model, steps, batch and optimizer); only the loss
differs: 0.5 CE + 0.5 forward KL between the next-byte distributions, at T = 1, as distill.py.
"""

import distill
import student_scratch


def get_config(arg: str = "kd"):
    if arg not in ("scratch", "kd"):
        raise ValueError(f"experiments/lm/cross_tokenizer.py takes 'scratch' or 'kd', got {arg!r}")
    c = distill.get_config() if arg == "kd" else student_scratch.get_config()
    c.data.name = "pystdlib_bpe"
    c.lm.chunk_size = 0  # the byte marginal needs the whole logits (512 tokens: small)
    if arg == "kd":
        c.lm.cross_tokenizer = "next_byte"
    return c
