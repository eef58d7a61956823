"""Input throughput next to the step's own rate: does the input ever bound training?

  PYTHONPATH=. python benchmarks/input.py [--steps 60] [--jpegs 192] [--batch-size 128]

On synthetic data in the original formats (no download), prepared with `kdjax prepare`:

* CIFAR-100-shaped data (32x32x3 PNG records), a tiny model (mlp_tiny, supervised):
  - the step's own rate: the streamed-mode step fed one batch already on the device;
  - device-resident: the step samples and gathers its own batches (kdjax.step.DeviceData);
  - streamed input alone: `kdjax.input.TrainStream` batches/s with no step consuming them;
  - streamed training: the step fed by TrainStream.
* ImageNet-style JPEGs (~375x500, ~60 KB, as typical ImageNet photos): images/s per CPU core of the
  streaming decode with the inception-style random-resized crop to 224x224 (the training path),
  the evaluation centre crop, and a plain full-resolution PIL decode for reference; then the
  TrainStream pipeline's images/s with 1 and with all worker threads.

Writes benchmarks/results/input_<platform>.{json,md} with the device, CPU and load it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
import optax
from flax import nnx
from PIL import Image

from benchmarks import common
from kdjax import augment, data, images, input as input_lib, models, objectives, plan, sharding
from kdjax import prepare as prepare_lib
from kdjax.step import DeviceData, init_train_state, make_distill_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Batches a stream may hold ready when a round starts (2 on the device, up to 4 being decoded):
#: drained untimed, so that a round measures the steady-state rate, not the backlog.
STREAM_BACKLOG = 6


def _best_rates(fns: dict, n: int, rounds: int, sync, streams: tuple = ()) -> dict:
    """Calls per second of each fn: the best of `rounds` rounds of n calls, the fns interleaved
    round by round (the machine is shared: the best round is the least disturbed one). The fns
    named in `streams` first drain their backlog, untimed."""
    for fn in fns.values():  # warm-up (compilation, pipeline start)
        sync(fn())
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in streams:
                for _ in range(STREAM_BACKLOG):
                    sync(fn())
            t = time.perf_counter()
            out = None
            for _ in range(n):
                out = fn()
            sync(out)
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def photo_jpeg(rng: np.random.Generator, h: int, w: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth random colour field with some texture and noise."""
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 20 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
    img = base + texture[..., None] + rng.normal(0, 6, (h, w, 3))
    return images.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality)


def bench_cifar(root: str, args) -> dict:
    src = prepare_lib.make_synthetic_cifar(os.path.join(root, "c.tar.gz"), "cifar100",
                                           n_train=args.cifar_examples, n_test=100)
    data_dir = os.path.join(root, "d")
    data.prepare("cifar100", src, data_dir=data_dir, verify_checksums=False)
    spec = data.dataset_info("cifar100", data_dir=data_dir)
    mesh = sharding.make_mesh()
    b = args.batch_size

    def fresh(num_examples=0):  # a new model each time: the step donates the state's buffers
        model = models.create_model("mlp_tiny", num_classes=100, rngs=nnx.Rngs(0),
                                    input_shape=spec.image_shape)
        return init_train_state(model, tx, seed=0, num_examples=num_examples)

    tx = optax.sgd(0.05, momentum=0.9)
    recipe = augment.Preprocess(mean=data.NORMALIZATION["cifar100"][0],
                                std=data.NORMALIZATION["cifar100"][1], crop_padding=4, flip=True)
    objective = objectives.supervised()
    out = {"dataset": f"synthetic cifar100-shaped, {args.cifar_examples} train images",
           "model": "mlp_tiny", "batch_size": b}

    # The step's own rate: one batch already on the device.
    arrays = data.load_arrays("cifar100", "train", data_dir=data_dir)
    graphdef, state = fresh()
    step = make_distill_step(graphdef, tx, objective, preprocess=recipe, mesh=mesh)
    batch = sharding.shard_batch({"image": arrays["image"][:b], "label": arrays["label"][:b]},
                                 mesh)
    states = {"fed": sharding.replicate(state, mesh)}

    def fed():
        states["fed"], m = step(states["fed"], batch)
        return m

    # Device-resident: the step samples its own batch.
    graphdef, state = fresh(len(arrays["label"]))
    dd = DeviceData(sharding.replicate({"image": arrays["image"], "label": arrays["label"]},
                                       mesh), batch_size=b)
    dstep = make_distill_step(graphdef, tx, objective, preprocess=recipe, mesh=mesh, data=dd)
    states["resident"] = sharding.replicate(state, mesh)

    def resident():
        states["resident"], m = dstep(states["resident"])
        return m

    # Streamed input alone, and feeding the step.
    reader = data.open_split("cifar100", "train", data_dir=data_dir)
    decode = input_lib.decode_spec(plan.as_plan({}).data, reader.spec, seed=0)
    workers = os.cpu_count() or 1
    alone = input_lib.TrainStream(reader, decode, seed=0, batch_size=b, mesh=mesh,
                                  num_workers=workers)
    feeding = input_lib.TrainStream(reader, decode, seed=0, batch_size=b, mesh=mesh,
                                    num_workers=workers)
    graphdef, state = fresh()
    states["streamed"] = sharding.replicate(state, mesh)

    def streamed():
        states["streamed"], m = step(states["streamed"], next(feeding))
        return m

    rates = _best_rates({"step_only_steps_per_s": fed, "device_resident_steps_per_s": resident,
                         "stream_input_batches_per_s": lambda: next(alone),
                         "stream_training_steps_per_s": streamed},
                        args.steps, args.rounds, jax.block_until_ready,
                        streams=("stream_input_batches_per_s", "stream_training_steps_per_s"))
    alone.close()
    feeding.close()
    out.update(rates)
    out["stream_workers"] = workers
    for k in ("step_only_steps", "device_resident_steps", "stream_input_batches",
              "stream_training_steps"):
        out[k.rsplit("_", 1)[0] + "_images_per_s"] = out[k + "_per_s"] * b
    return out


def bench_jpeg(root: str, args) -> dict:
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "jpegs")
    for split, n in (("train", args.jpegs), ("val", 16)):
        for i in range(n):
            cls = f"c{i % 4}"
            os.makedirs(os.path.join(folder, split, cls), exist_ok=True)
            h, w = (375, 500) if i % 3 else (500, 375)
            with open(os.path.join(folder, split, cls, f"{i}.JPEG"), "wb") as f:
                f.write(photo_jpeg(rng, h, w))
    data_dir = os.path.join(root, "d")
    data.prepare("imagefolder:photos", folder, data_dir=data_dir)
    reader = data.open_split("photos", "train", data_dir=data_dir)
    blobs, _ = reader.read(range(len(reader)))
    size = (224, 224)
    out = {"images": len(blobs), "mean_jpeg_kb": float(np.mean([len(x) for x in blobs]) / 1024),
           "source_size": "375x500 / 500x375", "output_size": "224x224"}

    def per_core(fn):  # one thread; best of 3 passes (the machine is shared)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for i, blob in enumerate(blobs):
                fn(i, blob)
            best = min(best, time.perf_counter() - t)
        return len(blobs) / best

    def full_decode(i, blob):
        with Image.open(io.BytesIO(blob)) as im:
            im.convert("RGB").load()

    out["full_decode_images_per_s_per_core"] = per_core(full_decode)
    out["random_resized_crop_images_per_s_per_core"] = per_core(
        lambda i, blob: images.decode_random_resized_crop(blob, size, np.random.default_rng(i)))
    out["eval_center_crop_images_per_s_per_core"] = per_core(
        lambda i, blob: images.decode_center_crop(blob, size))
    crop = plan.as_plan({"data": {"image_size": 224, "random_resized_crop": True}}).data
    decode = input_lib.decode_spec(crop, reader.spec, seed=0)
    mesh = sharding.make_mesh()
    b = 16
    streams = {w: input_lib.TrainStream(reader, decode, seed=0, batch_size=b, mesh=mesh,
                                        num_workers=w) for w in sorted({1, os.cpu_count() or 1})}
    rates = _best_rates({w: (lambda s=s: next(s)) for w, s in streams.items()},
                        max(8, 2 * len(blobs) // b), args.rounds, jax.block_until_ready,
                        streams=tuple(streams))
    for workers, rate in rates.items():
        streams[workers].close()
        out[f"stream_{workers}_workers_images_per_s"] = rate * b
        out[f"stream_{workers}_workers_images_per_s_per_worker"] = rate * b / workers
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the best one counts)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cifar-examples", type=int, default=5000)
    p.add_argument("--jpegs", type=int, default=192)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--render", metavar="FILE.json",
                   help="print the markdown of an earlier run's results and exit")
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)), end="")
        return
    with tempfile.TemporaryDirectory() as root:
        load_before = os.getloadavg()
        cifar = bench_cifar(root, args)
        jpeg = bench_jpeg(root, args)
        load_after = os.getloadavg()
    dev = jax.devices()[0]
    result = {
        "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                   "num_devices": jax.device_count(), "cpu": common.cpu_name(),
                   "cpu_cores": os.cpu_count(),
                   "note": ("a 2-core CPU machine shared with other jobs (no accelerator): "
                            "rates are noisy; the 1-minute load average is recorded")
                   if dev.platform == "cpu" and os.cpu_count() == 2 else ""},
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "software": {"python": platform.python_version(), "jax": jax.__version__,
                     "pillow": Image.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cifar": cifar,
        "jpeg": jpeg,
    }
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"input_{dev.platform}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)


def markdown(result: dict) -> str:
    """The results file's table and reading notes (also: `--render FILE.json`)."""
    c, j, d = result["cifar"], result["jpeg"], result["device"]
    ratio = c["device_resident_steps_per_s"] / c["step_only_steps_per_s"]
    md = [
        f"# Input throughput ({d['device_kind']}, {d['cpu_cores']} CPU cores: {d['cpu']})",
        "",
        f"{d['note']}. Load average (1 min) {result['load_average_1min']['before']:.1f} before, "
        f"{result['load_average_1min']['after']:.1f} after. jax {jax.__version__}, "
        f"{result['date']}. Produced by `benchmarks/input.py`.",
        "",
        f"## CIFAR-100-shaped data, {c['model']}, batch {c['batch_size']}",
        "",
        "| what | steps (batches)/s | images/s |",
        "|---|---:|---:|",
        f"| the step's own rate (batch already on device) | {c['step_only_steps_per_s']:.1f} | "
        f"{c['step_only_images_per_s']:,.0f} |",
        f"| device-resident training (step samples its batch) | "
        f"{c['device_resident_steps_per_s']:.1f} | {c['device_resident_images_per_s']:,.0f} |",
        f"| streamed input alone ({c['stream_workers']} decode threads, no step) | "
        f"{c['stream_input_batches_per_s']:.1f} | {c['stream_input_images_per_s']:,.0f} |",
        f"| streamed training (step fed by the stream) | {c['stream_training_steps_per_s']:.1f} | "
        f"{c['stream_training_images_per_s']:,.0f} |",
        "",
        f"## JPEG decode for streaming ({j['images']} photo-like JPEGs, {j['source_size']}, "
        f"mean {j['mean_jpeg_kb']:.0f} KB -> {j['output_size']})",
        "",
        "| what | images/s |",
        "|---|---:|",
        f"| full-resolution PIL decode, 1 core (reference) | "
        f"{j['full_decode_images_per_s_per_core']:,.0f} |",
        f"| inception random-resized crop (training), 1 core | "
        f"{j['random_resized_crop_images_per_s_per_core']:,.0f} |",
        f"| centre crop (evaluation), 1 core | {j['eval_center_crop_images_per_s_per_core']:,.0f} |",
    ]
    for k in sorted(j):
        if k.startswith("stream_") and k.endswith("workers_images_per_s"):
            n = k.split("_")[1]
            md.append(f"| TrainStream pipeline, {n} worker thread(s) (read, parse, crop, "
                      f"device put) | {j[k]:,.0f} ({j[k + '_per_worker']:,.0f} per thread) |")
    rrc = j["random_resized_crop_images_per_s_per_core"]
    md += [
        "",
        "Reading:",
        "",
        f"- Device-resident training runs at {ratio:.0%} of the step's own rate, with no host "
        f"work per step. " + (
            "Within this machine's noise the two are equal: sampling and gathering the batch "
            "inside the step (`kdjax.step.sample`) costs nothing measurable next to the step."
            if ratio >= 0.9 else
            "The difference is the in-graph gather and the epoch-boundary `lax.cond` of "
            "`kdjax.step.sample`, compiled into the step (on XLA:CPU, with a step this small)."),
        f"- The streamed input alone delivers {c['stream_input_images_per_s']:,.0f} CIFAR images/s "
        f"on {c['stream_workers']} threads ({c['stream_input_batches_per_s'] / c['step_only_steps_per_s']:.2f}x "
        f"the tiny step's rate). On this CPU-only machine the decode threads and XLA's compute "
        f"share the same 2 cores, so streamed training is slower than either alone; with an "
        f"accelerator the step leaves the host cores to the input.",
        f"- JPEG: {rrc:,.0f} images/s per core for the training decode (random-resized crop to "
        f"224); PIL's resampling to 224x224 costs about as much as decoding a 375x500 JPEG here, "
        f"and libjpeg's reduced-scale decode only applies to crops at least twice the output size "
        f"(large photos). At this rate one accelerator step of N images/s needs about "
        f"N/{rrc:,.0f} host cores for decoding; per-thread rates fall when threads outnumber "
        f"free cores, as on this shared machine.",
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
