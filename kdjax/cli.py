"""The `kdjax` command line.

  kdjax train   --config experiments/fashion_mnist/teacher.py --workdir workdirs/teacher
  kdjax distill --config experiments/fashion_mnist/kd.py --workdir workdirs/kd --config.train.steps=200
  kdjax distill --config experiments/fashion_mnist/kd.py --workdir workdirs/ban --generations 3
  kdjax eval    --workdir workdirs/kd            (reads the run's config.json)
  kdjax export  --workdir workdirs/kd --out exports/kd   (the student alone, for inference)
  kdjax export  --workdir workdirs/kd --out exports/kd_int8 --config.quant.mode=ptq  (int8 weights)
  kdjax export  --workdir workdirs/kd --out exports/kd_pt --format torch   (for load_state_dict)
  kdjax import  --from resnet50.pth --model resnet50 --out workdirs/r50   (a PyTorch teacher)
  kdjax import  --hf models/Qwen3-0.6B --out workdirs/qwen3   (a Hugging Face causal LM)
  kdjax report  workdirs/teacher workdirs/kd exports/kd --out reports/kd   (accuracy, calibration,
                                           fidelity, size, speed: report.json, report.md, charts)
  kdjax prepare fashion_mnist --from /usr/share/datasets/fashion-mnist
  kdjax prepare cifar100 --from ~/cifar-100-python.tar.gz
  kdjax prepare text --from DIR_OR_FILES... --name pystdlib --pattern '*.py'   (LM corpora)
  kdjax cache-teacher --teacher workdirs/lm/teacher --data pystdlib --top-k 64 --out caches/t64
                                           (an LM teacher's top-k, for --config.teacher.cache)
  kdjax datasets                           (what is prepared where)
  kdjax bench [--rows resnet56:resnet20@64]  (the step-throughput suite vs PyTorch, from a checkout)

train/distill resume from the workdir's latest checkpoint (--fresh refuses a workdir that has
one). Exit codes: 0 done; 1 stopped during training (non-finite step, checkpoint failure); 2 refused
before training (bad config, argument, workdir, data or teacher); 128+N interrupted by signal N
(143 SIGTERM, 130 SIGINT) after saving a checkpoint: run the same command again to resume.

Several hosts: the same command on every host, plus --coordinator HOST:PORT --num-processes N
--process-id I unless SLURM, Open MPI or a TPU pod provides them (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdjax", description="Knowledge distillation in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "supervised training (a teacher, or a baseline student)"),
                       ("distill", "distil a student from teacher.workdir's model"),
                       ("eval", "evaluate a workdir's latest checkpoint")):
        c = sub.add_parser(name, help=text,
                           epilog="Override any config key with --config.KEY=VALUE, e.g. "
                                  "--config.train.steps=200 --config.loss.kwargs={'temperature':2.0}")
        c.add_argument("--config", required=name != "eval",
                       help="experiment file with get_config() (eval: default WORKDIR/config.json)")
        c.add_argument("--workdir", required=True, help="where the run's outputs go")
        c.add_argument("--no-progress", action="store_true",
                       help="no progress bar, even on a terminal: a line per log period and "
                            "per phase instead")
        if name != "eval":
            c.add_argument("--fresh", action="store_true",
                           help="start from step 0; refused if WORKDIR already has checkpoints "
                                "(by default a run resumes from them)")
        if name == "distill":
            c.add_argument("--generations", type=int, default=1,
                           help="born-again networks: distil N generations in a row, each the "
                                "teacher of the next, into WORKDIR/gen_1..gen_N")
        multi = c.add_argument_group(
            "multi-host", "every process runs the same command (docs/scaling.md); under SLURM, "
            "Open MPI or on a TPU pod these are detected and may be left out")
        multi.add_argument("--coordinator", metavar="HOST:PORT",
                           help="address of process 0's coordinator service")
        multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
        multi.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    exp = sub.add_parser("export", help="write a run's student alone (no optimizer state), with "
                                        "a snippet to load and run it")
    exp.add_argument("--workdir", required=True, help="the run to export")
    exp.add_argument("--out", required=True, help="directory to create (must not exist)")
    exp.add_argument("--step", default="latest",
                     help="'latest' (default), 'best' (by checkpoint.best_metric) or a step number")
    exp.add_argument("--format", default="kdjax",
                     choices=("kdjax", "safetensors", "torch", "stablehlo", "onnx", "litert", "hf"),
                     help="kdjax (default: Orbax, for kdjax.export.load); safetensors / torch: "
                          "the state_dict for PyTorch's load_state_dict (the .pth is written "
                          "without torch); stablehlo: the serialized inference function "
                          "(jax.export), uint8 images in, logits out; onnx: that function as an "
                          "ONNX graph (int8 students with integer weights), checked in ONNX "
                          "Runtime before it is written; litert: that function as a LiteRT "
                          "(TFLite) model for mobile, float students, checked in the LiteRT "
                          "interpreter (the litert extra); hf: a language model as a Hugging Face "
                          "folder (transformers' from_pretrained)")
    exp.add_argument("--lora", default="merge", choices=("merge", "separate"),
                     help="a LoRA run (model.lora): merge the adapters into the weights (default)"
                          ", or write them alone in PEFT's layout (adapter_config.json + "
                          "adapter_model.safetensors, for peft.PeftModel.from_pretrained)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                     help="--format hf: the weights' dtype (default float32)")
    exp.add_argument("--max-shard-mb", type=float, default=None,
                     help="--format hf: safetensors files above this size are split into shards "
                          "with an index (default 5120, save_pretrained's 5 GB)")
    exp.add_argument("--layout", default=None,
                     choices=("torchvision", "crd", "pytorch", "kdjax"),
                     help="state_dict naming for safetensors/torch (default: the one the model "
                          "was imported in, else its architecture's reference, else kdjax)")
    imp = sub.add_parser("import", help="map a PyTorch .pth / .safetensors state_dict onto a zoo "
                                        "model, take any PyTorch module (--torch) or a Hugging "
                                        "Face causal LM (--hf), and write it as a run (a "
                                        "teacher.workdir)")
    imp.add_argument("--from", dest="source", default=None, metavar="FILE",
                     help=".pth/.pt (read without running pickled code) or .safetensors "
                          "(required with --model; with --torch default: the factory's weights)")
    imp.add_argument("--model", default=None, help="zoo model name, e.g. resnet50, resnet32x4")
    imp.add_argument("--torch", default=None, metavar="FACTORY",
                     help="any PyTorch module: 'package.module:callable' returning an nn.Module, "
                          "e.g. timm:create_model, torchvision.models:resnet50, my_models:Net "
                          "(run through torchax; needs pip install 'kdjax[torch]')")
    imp.add_argument("--hf", default=None, metavar="DIR",
                     help="a Hugging Face causal-LM folder (config.json, model*.safetensors, "
                          "tokenizer files): Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3 "
                          "(text)")
    imp.add_argument("--torch-kwargs", default=None, metavar="JSON",
                     help="the factory's keyword arguments, e.g. '{\"model_name\": "
                          "\"convnext_atto\", \"num_classes\": 10}'")
    imp.add_argument("--out", required=True, help="run directory to create (must not exist)")
    imp.add_argument("--num-classes", type=int, default=None,
                     help="classifier outputs (default: read off the file's classifier); with "
                          "--torch and a causal LM, its vocabulary size")
    imp.add_argument("--input-shape", default=None, metavar="H,W,C",
                     help="default: the layout's (torchvision 224,224,3; crd 32,32,3); with "
                          "--torch, T alone (a sequence length) imports a causal language model")
    imp.add_argument("--layout", default=None, choices=("torchvision", "crd", "kdjax"),
                     help="the file's naming (default: the architecture's reference)")
    imp.add_argument("--mean", default=None, metavar="M,M,M",
                     help="input normalisation the weights were trained with (default: the "
                          "layout's: torchvision ImageNet's, crd RepDistiller's CIFAR-100)")
    imp.add_argument("--std", default=None, metavar="S,S,S")
    imp.add_argument("--data", default=None, metavar="NAME",
                     help="data.name recorded for the run (default: imagenet2012 / cifar100)")
    imp.add_argument("--data-dir", default=None, metavar="DIR",
                     help="where --data is prepared (recorded: kdjax eval and report read it "
                          "there; default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    imp.add_argument("--model-kwargs", default=None, metavar="JSON",
                     help="zoo constructor arguments (model.kwargs), e.g. '{\"channels\": "
                          "[32, 64, 128, 256]}'")
    imp.add_argument("--key", default=None,
                     help="the entry of a checkpoint dict that holds the state_dict (default: "
                          "state_dict / model_state_dict / model / net, when it is one)")
    prep = sub.add_parser("prepare", help="prepare a dataset offline from files you copied in")
    prep.add_argument("name", help="dataset name: mnist, fashion_mnist, cifar10, cifar100, "
                                   "imagenette[/config], imagenet2012, any name (or "
                                   "imagefolder:NAME) for an ImageNet-style folder tree, or "
                                   "'text' for a text corpus (language models)")
    prep.add_argument("--from", dest="source", required=True, nargs="+",
                      help="folder with the source files (text: files and/or folders; .jsonl "
                           "files hold one prompt/response, messages or text example a line)")
    prep.add_argument("--data-dir", default=None,
                      help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    prep.add_argument("--skip-checksums", action="store_true",
                      help="accept files whose checksums differ from the official ones")
    prep.add_argument("--max-examples", type=int, default=None,
                      help="keep only N examples of each split (quick demos, tests)")
    prep.add_argument("--workers", type=int, default=None,
                      help="threads reading and checking images of folder trees (default: one "
                           "per CPU core)")
    text = prep.add_argument_group("text", "kdjax prepare text: tokenized, packed rows for "
                                           "language models (kdjax.prepare.text)")
    text.add_argument("--name", dest="text_name", default="text",
                      help="the text dataset's name (data.name)")
    text.add_argument("--tokenizer", default="byte",
                      help="'byte' (built in), 'bpe' (trained on the corpus; needs the "
                           "tokenizers package) or the path of a tokenizer.json")
    text.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    text.add_argument("--seq-len", type=int, default=256, help="positions per packed row")
    text.add_argument("--held-out", type=float, default=0.05,
                      help="fraction of documents in the validation split")
    text.add_argument("--pattern", default="*", help="file-name glob in folders, e.g. '*.py'")
    text.add_argument("--seed", type=int, default=0, help="the order documents are packed in")
    text.add_argument("--chat-template", default=None, metavar="PATH",
                      help="Jinja chat template (or a tokenizer_config.json holding one) for the "
                           "conversations of .jsonl files; default: the one beside --tokenizer's "
                           "tokenizer.json, else the plain 'role: content' format")
    cache = sub.add_parser("cache-teacher", help="write an LM teacher's top-k next-token "
                                                 "distributions over a text split, for "
                                                 "--config.teacher.cache (kdjax.lm.cache)")
    cache.add_argument("--teacher", required=True, metavar="RUN", help="the LM teacher's workdir")
    cache.add_argument("--data", required=True, metavar="NAME", help="the prepared text dataset")
    cache.add_argument("--split", default="train", help="its split (default: train)")
    cache.add_argument("--top-k", type=int, required=True, metavar="K", help="tokens kept per "
                                                                           "position")
    cache.add_argument("--out", required=True, metavar="DIR",
                       help="the cache directory (an interrupted one is resumed)")
    cache.add_argument("--data-dir", default=None,
                       help="where --data is prepared (default $TFDS_DATA_DIR or "
                            "~/tensorflow_datasets)")
    cache.add_argument("--batch-size", type=int, default=32, help="rows per teacher call")
    cache.add_argument("--rows-per-shard", type=int, default=1024, help="rows per ArrayRecord "
                                                                        "shard")
    cache.add_argument("--value-bits", type=int, default=9,
                       help="bits per cached log-probability (default 9; the error bound halves "
                            "with each bit)")
    ds = sub.add_parser("datasets", help="list the prepared datasets, with split sizes and shapes")
    ds.add_argument("--data-dir", default=None,
                    help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    sub.add_parser("bench", add_help=False,
                   help="time the fused step against the PyTorch peer (benchmarks/suite.py; "
                        "kdjax bench --help)")
    summ = sub.add_parser("summary", help="print the summary.json of finished runs side by side")
    summ.add_argument("workdirs", nargs="+")
    rep = sub.add_parser("report", help="accuracy, calibration, fidelity, size and speed of runs "
                                        "and exports: report.json, report.md and charts")
    rep.add_argument("paths", nargs="+", metavar="RUN_OR_EXPORT")
    rep.add_argument("--out", default="report", help="folder for report.json, report.md and the "
                                                    "PNGs (default: ./report)")
    rep.add_argument("--split", default=None,
                     help="split to evaluate (default: the first model's data.eval_split)")
    rep.add_argument("--calibration-split", default=None,
                     help="held-out split to fit the temperature on (default: the rest of a run's "
                          "train[:N] slice, else the dataset's validation split)")
    rep.add_argument("--teacher", default=None,
                     help="run or export to measure fidelity against (default: each run's "
                          "teacher.workdir)")
    rep.add_argument("--data-dir", default=None, help="TFDS data dir (default: the run's)")
    rep.add_argument("--dataset", default=None,
                     help="dataset name, for exports that do not record theirs")
    rep.add_argument("--step", default="latest", help="a run's checkpoint: latest, best or N")
    rep.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    rep.add_argument("--no-speed", action="store_true", help="skip the latency/throughput timing")
    rep.add_argument("--runtime", default=None, choices=("onnxruntime", "litert"),
                     help="also time each model in this runtime beside XLA at batches 1, 8, 64, "
                          "256 (converted as kdjax export --format onnx, or --format litert for "
                          "the LiteRT interpreter); speedups below 1x are flagged")
    return p


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key.startswith("eval/"):
        return f"{v:.2%}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:,.0f}"
    return str(v)


#: `kdjax summary`'s columns for language-model runs (their summary has eval/perplexity).
LM_COLUMNS = (("run", None), ("model", "model"), ("params", "num_params"), ("seed", "seed"),
              ("loss", "loss"), ("perplexity", "eval/perplexity"),
              ("next_token_acc", "eval/accuracy"), ("agree_w_teacher", "eval/teacher_agreement"),
              ("steps", "steps"), ("tok/s", "tokens_per_s"), ("device", "device_kind"))


def summary_table(workdirs: Sequence[str]) -> str:
    """One row per run: the numbers a distillation comparison is judged by."""
    cols = (("run", None), ("model", "model"), ("params", "num_params"),
            ("seed", "seed"), ("accuracy", "eval/accuracy"), ("top5", "eval/top5_accuracy"),
            ("agree_w_teacher", "eval/teacher_agreement"), ("steps", "steps"),
            ("img/s", "images_per_s"), ("device", "device_kind"))
    summaries = []
    for w in workdirs:
        path = os.path.join(w, "summary.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {w!r} has no finished run")
        with open(path) as f:
            summaries.append(json.load(f))
    if any("eval/perplexity" in s for s in summaries):
        cols = LM_COLUMNS
    rows = []
    for w, s in zip(workdirs, summaries):
        row = [w if key is None else (f"{s[key]:.3f}" if key == "eval/perplexity" and
                                      s.get(key) is not None else _fmt(key, s.get(key)))
               for _, key in cols]
        rows.append(row)
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, (t, _) in enumerate(cols)]
    lines = ["  ".join(t.ljust(w) for (t, _), w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def datasets_table(data_dir: str | None) -> str:
    """What `kdjax datasets` prints: one row per prepared dataset under the data dir."""
    from kdjax import data
    from kdjax.lm import data as text_data
    from kdjax.prepare.common import resolve_data_dir

    root = resolve_data_dir(data_dir)
    entries = data.list_datasets(root)
    texts = text_data.list_text(root)
    if texts:  # language-model corpora (kdjax prepare text)
        rows = [(t.meta["name"], " ".join(f"{k}={v['sequences']:,}" for k, v in t.splits.items()),
                 str(t.seq_len), f"{t.meta['tokenizer']['kind']}/{t.vocab_size}", t.path)
                for t in texts]
        cols = ("text dataset", "rows", "seq_len", "tokenizer", "path")
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        text_table = "\n".join(["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
                               + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                                  for r in rows])
        if not entries:
            return f"data dir: {root}\n{text_table}"
    if not entries:
        return (f"no prepared datasets in {root}\n(prepare one offline with `kdjax prepare NAME "
                f"--from DIR --data-dir {root}`)")
    cols = ("name", "version", "splits", "image", "classes", "by", "path")
    rows = []
    for e in entries:
        shape = "x".join("?" if s is None else str(s) for s in e.image_shape) if e.image_shape else "-"
        splits = " ".join(f"{k}={v:,}" for k, v in e.splits.items()) or "-"
        path = e.path + (f"  ({e.problem})" if e.problem else "")
        rows.append((e.name, e.version, splits, shape, str(e.num_classes or "-"), e.prepared_by,
                     path))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [f"data dir: {root}", "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if texts:
        lines.append(text_table)
    return "\n".join(lines)


def _numbers(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, e.g. 0.485,0.456,0.406; got "
                         f"{text!r}") from None


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    values = _numbers(text, flag)
    if values is not None and not all(v == int(v) for v in values):
        raise ValueError(f"{flag} must be comma-separated integers, e.g. 224,224,3; got {text!r}")
    return None if values is None else tuple(int(v) for v in values)


def _json_dict(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"depth\": 8}}'; got {text!r} "
                         f"({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _import_torch(args: argparse.Namespace) -> int:
    """`kdjax import --torch FACTORY`: kdjax.torchbridge.importer."""
    from kdjax import models

    try:
        from kdjax.torchbridge import importer as torch_importer
    except ImportError as e:
        raise ValueError(f"--torch {args.torch!r} runs PyTorch modules through torchax, which is "
                         f"not installed ({e}): {models.TORCH_EXTRA}") from None
    report = torch_importer.import_torch(
        args.torch, out=args.out, num_classes=args.num_classes,
        input_shape=_ints(args.input_shape, "--input-shape"),
        factory_kwargs=_json_dict(args.torch_kwargs, "--torch-kwargs"), source=args.source,
        mean=_numbers(args.mean, "--mean"), std=_numbers(args.std, "--std"), dataset=args.data,
        key=args.key, data_dir=args.data_dir)
    for note in report.notes:
        print(f"kdjax: note: {note}")
    print(f"kdjax: {torch_importer.describe(report)}; use it as "
          f"--config.teacher.workdir={report.out}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    """`kdjax import --hf DIR`: kdjax.lm.hf."""
    given = [f for f, v in (("--from", args.source), ("--num-classes", args.num_classes),
                            ("--input-shape", args.input_shape), ("--layout", args.layout),
                            ("--mean", args.mean), ("--std", args.std), ("--key", args.key),
                            ("--model-kwargs", args.model_kwargs),
                            ("--torch-kwargs", args.torch_kwargs)) if v is not None]
    if given:
        _parser().error(f"kdjax import --hf reads everything from the folder; drop {given}")
    from kdjax.lm import hf

    report = hf.import_hf(args.hf, out=args.out, dataset=args.data, data_dir=args.data_dir)
    for note in report.notes:
        print(f"kdjax: note: {note}")
    print(f"kdjax: {hf.describe(report)}; use it as --config.teacher.workdir={report.out} or "
          f"--config.init.workdir={report.out} (with --config.model.name={report.spec.name})")
    return 0


def _load_config(args: argparse.Namespace, overrides: Sequence[str]):
    from kdjax import config as config_lib, plan

    if args.config:
        return config_lib.load(args.config, overrides)
    config = config_lib.from_json(plan.read_run(args.workdir).to_json())
    for item in overrides:
        config_lib.apply_override(config, item)
    return config


def _bench(argv: Sequence[str]) -> int:
    # The suite lives in the repository's benchmarks/ folder, next to this package, not in the
    # installed package; PyTorch and matplotlib are imported only by the suite, when it runs.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "suite.py")):
        raise FileNotFoundError(f"kdjax bench runs benchmarks/suite.py of a kdjax checkout, and "
                                f"{root} has none: run it from a clone (pip install -e .)")
    sys.path.insert(0, root)
    from benchmarks import suite

    return suite.main(argv, prog="kdjax bench")


def _private_or_data_free(args: argparse.Namespace, config) -> bool:
    """Whether the run is a PATE ensemble, a PATE student (kdjax.privacy) or data-free."""
    return ((args.command == "train" and config.pate.teachers > 0)
            or (args.command == "distill" and bool(config.teacher.aggregation
                                                   or config.datafree.method)))


def _run_private_or_data_free(args: argparse.Namespace, config) -> dict:
    if getattr(args, "generations", 1) != 1:
        raise ValueError("--generations (born-again) distils each student from the last; it does "
                         "not combine with teacher.aggregation, pate.teachers or datafree.method")
    progress = dict(progress=not args.no_progress, fresh=args.fresh)
    if args.command == "train":
        from kdjax.privacy import partitions

        return partitions.train_ensemble(config, args.workdir, **progress)
    if config.datafree.method:
        from kdjax.datafree import run

        return run.distill(config, args.workdir, **progress)
    from kdjax.privacy import pate

    return pate.distill(config, args.workdir, **progress)


def _prepare_text(args: argparse.Namespace) -> int:
    from kdjax.lm import data as text_data
    from kdjax.prepare.text import prepare_text

    path = prepare_text(args.source, name=args.text_name, data_dir=args.data_dir,
                        tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        seq_len=args.seq_len, held_out=args.held_out, pattern=args.pattern,
                        seed=args.seed, max_examples_per_split=args.max_examples,
                        chat_template=args.chat_template)
    ds = text_data.open_text(args.text_name, args.data_dir)
    sizes = ", ".join(f"{k} {v['sequences']:,} rows / {v['documents']:,} documents / "
                      f"{v['target_tokens']:,} target tokens" for k, v in ds.splits.items())
    chat = f"; conversations rendered by the {ds.meta['chat_format']}, only their responses " \
        f"counted" if ds.masked else ""
    print(f"kdjax: prepared text dataset {args.text_name} in {path} ({sizes}; seq_len {ds.seq_len}; "
          f"{ds.meta['tokenizer']['kind']} tokenizer, {ds.vocab_size:,} tokens{chat})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args, extra = _parser().parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "prepare":
        if overrides:
            _parser().error("kdjax prepare takes no --config overrides")
        if args.name == "text":
            return _prepare_text(args)
        if len(args.source) != 1:
            _parser().error(f"kdjax prepare {args.name} takes one --from, got {args.source}")
        from kdjax import data

        path = data.prepare(args.name, args.source[0], data_dir=args.data_dir,
                            verify_checksums=not args.skip_checksums,
                            max_examples_per_split=args.max_examples, num_workers=args.workers)
        from pathlib import Path

        spec = data.spec_from_dir(args.name.removeprefix("imagefolder:"), Path(path))
        sizes = ", ".join(f"{k} {v:,}" for k, v in spec.splits.items())
        print(f"kdjax: prepared {spec.name} {spec.version} in {path} ({sizes}; "
              f"{spec.num_classes} classes)")
        return 0
    if args.command == "cache-teacher":
        if overrides:
            _parser().error("kdjax cache-teacher takes no --config overrides")
        from kdjax.lm import cache as teacher_cache

        manifest = teacher_cache.cache_teacher(
            args.teacher, args.data, args.out, top_k=args.top_k, split=args.split,
            data_dir=args.data_dir, value_bits=args.value_bits, batch_size=args.batch_size,
            rows_per_shard=args.rows_per_shard,
            on_shard=lambda done, total: print(f"kdjax: shard {done} of {total} written",
                                               flush=True))
        print(f"kdjax: teacher cache of {manifest['rows']:,} rows (top {manifest['k']}, "
              f"{manifest['scheme']['bytes_per_token']} bytes a position) in {args.out}; "
              f"distil from it with --config.teacher.cache={args.out}")
        return 0
    if args.command == "datasets":
        if overrides:
            _parser().error("kdjax datasets takes no --config overrides")
        print(datasets_table(args.data_dir))
        return 0

    if args.command == "summary":
        print(summary_table(args.workdirs))
        return 0
    if args.command == "report":
        if overrides:
            _parser().error("kdjax report takes no --config overrides")
        from kdjax import report

        result = report.make_report(
            args.paths, out=args.out, split=args.split, calibration_split=args.calibration_split,
            teacher=args.teacher, dataset=args.dataset, data_dir=args.data_dir,
            batch_size=args.batch_size, speed=not args.no_speed, step=args.step,
            runtime=args.runtime)
        print(report.render.markdown(result))
        print(f"kdjax: wrote {os.path.join(args.out, 'report.json')} and report.md")
        return 0
    if args.command == "export":
        from kdjax import export
        from kdjax.task import run_kind

        hf_only = [f for f, v in (("--dtype", args.dtype), ("--max-shard-mb", args.max_shard_mb))
                   if v is not None]
        if hf_only and args.format != "hf":
            _parser().error(f"{' and '.join(hf_only)}: only for --format hf")
        kind = run_kind(args.workdir)
        if args.format == "hf" and kind != "lm":
            _parser().error(f"--format hf writes a language model as a Hugging Face folder; "
                            f"{args.workdir} is {'an image' if kind else 'not a kdjax'} run")
        if args.lora == "separate":
            if kind != "lm" or args.format != "kdjax" or overrides:
                _parser().error("--lora separate writes a language model's LoRA adapters in "
                                "PEFT's layout, with no --format or --config overrides")
            from kdjax import lora

            path = lora.export_separate(args.workdir, args.out, step=args.step)
            print(f"kdjax: exported the LoRA adapters to {path}; load them with peft."
                  f"PeftModel.from_pretrained(base_model, {path!r})")
            return 0
        if kind == "lm":  # the language model and its tokenizer
            from kdjax.lm import task as lm_task

            if args.format not in ("kdjax", "hf", "onnx") or overrides:
                _parser().error(f"kdjax export of a language model writes --format kdjax, hf or "
                                f"onnx with no --config overrides (got --format {args.format}"
                                f"{' and ' + ' '.join(overrides) if overrides else ''})")
            if args.format == "hf":
                from kdjax.lm import hf

                given = {"dtype": args.dtype, "max_shard_bytes": None if args.max_shard_mb is None
                         else int(args.max_shard_mb * 2**20)}
                path = hf.export(args.workdir, args.out, step=args.step,
                                 **{k: v for k, v in given.items() if v is not None})
                print(f"kdjax: exported the student to {path} as a Hugging Face folder; load it "
                      f"with transformers.AutoModelForCausalLM.from_pretrained({path!r})")
                return 0
            if args.format == "onnx":
                path = lm_task.export_onnx(args.workdir, args.out, step=args.step)
                print(f"kdjax: exported the student to {path} (onnx); how to load it: "
                      f"{os.path.join(path, 'README.md')}")
                return 0
            path = lm_task.export(args.workdir, args.out, step=args.step)
            print(f"kdjax: exported the student to {path}; load and run it with:\n"
                  f"{lm_task.SNIPPET.format(path=path)}")
            return 0
        # --config.quant.* quantizes a float run on export (kdjax.compress.encode).
        path = export.export(args.workdir, args.out, step=args.step, format=args.format,
                             layout=args.layout, overrides=overrides)
        if args.format == "kdjax":
            with open(os.path.join(path, export.META_FILE)) as f:
                record = json.load(f).get("compression")
            if record is not None:
                from kdjax.compress import encode

                print(encode.describe(record))
            print(f"kdjax: exported the student to {path}; load and run it with:\n"
                  f"{export.snippet(path)}")
        else:
            print(f"kdjax: exported the student to {path} ({args.format}); how to load it: "
                  f"{os.path.join(path, 'README.md')}")
        return 0
    if args.command == "import":
        if overrides:
            _parser().error("kdjax import takes no --config overrides")
        if sum(x is not None for x in (args.model, args.torch, args.hf)) != 1:
            _parser().error("kdjax import takes one of --model NAME (a zoo model), --torch "
                            "FACTORY (any PyTorch module) or --hf DIR (a Hugging Face causal LM)")
        if args.torch is not None:
            return _import_torch(args)
        if args.hf is not None:
            return _import_hf(args)
        if args.source is None:
            _parser().error("kdjax import --model needs --from FILE (the state_dict to map)")
        if args.torch_kwargs is not None:
            _parser().error("--torch-kwargs goes with --torch FACTORY, not --model")
        from kdjax.interop import importer

        report = importer.import_checkpoint(
            args.source, model=args.model, out=args.out, num_classes=args.num_classes,
            input_shape=_ints(args.input_shape, "--input-shape"), layout=args.layout,
            mean=_numbers(args.mean, "--mean"), std=_numbers(args.std, "--std"),
            model_kwargs=_json_dict(args.model_kwargs, "--model-kwargs"), key=args.key,
            dataset=args.data, data_dir=args.data_dir)
        for note in report.notes:
            print(f"kdjax: note: {note}")
        print(f"kdjax: {report.describe()}; use it as --config.teacher.workdir={report.out}")
        return 0

    from kdjax import distributed

    # Before any JAX computation: afterwards jax.devices() spans every process.
    how = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if how:
        import jax

        print(f"kdjax: process {jax.process_index()} of {jax.process_count()} ({how}), "
              f"{jax.device_count()} devices", flush=True)
    config = _load_config(args, overrides)
    from kdjax import trainer
    from kdjax.task import task_kind

    if task_kind(config.model.name) == "lm":
        if args.command == "distill" and args.generations != 1:
            _parser().error("--generations (born-again networks) is for image models, not "
                            f"language models (model.name={config.model.name!r})")
        if _private_or_data_free(args, config):
            _parser().error("PATE (pate.teachers, teacher.aggregation) and data-free distillation "
                            "(datafree.method) are for image models, not language models "
                            f"(model.name={config.model.name!r})")

    if args.command == "eval":
        result = trainer.evaluate(config, args.workdir)
    elif _private_or_data_free(args, config):
        result = _run_private_or_data_free(args, config)
    elif args.command == "distill" and args.generations != 1:
        result = trainer.train_generations(config, args.workdir, args.generations,
                                           progress=not args.no_progress, fresh=args.fresh)
    else:
        result = trainer.train(config, args.workdir, distill=args.command == "distill",
                               progress=not args.no_progress, fresh=args.fresh)
    print(json.dumps(result, indent=2))
    return 0


def entry() -> None:
    """Console-script entry point: errors print a clear message, not a traceback, and exit with
    the codes of kdjax.errors."""
    from kdjax.errors import Interrupted, RunError

    try:
        sys.exit(main())
    except Interrupted as e:
        print(f"kdjax: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    # OSError: a path that is a directory, unreadable, ... (the message names the path).
    except (RunError, ValueError, TypeError, OSError) as e:
        if os.environ.get("KDJAX_TRACEBACK"):
            raise
        print(f"kdjax: error: {e}\n(set KDJAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, RunError) else 2)
