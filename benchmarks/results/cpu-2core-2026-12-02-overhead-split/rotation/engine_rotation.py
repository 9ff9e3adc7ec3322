import sys, time, tempfile
from statistics import median
sys.path.insert(0, "/work/main/benchmarks")
import torch
from bench_step import EngineClock, to_device
from pixelbert_dist.config import load_config
from pixelbert_dist.console import Progress
from pixelbert_dist.data.builders.synthetic import build_synthetic
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.trainer import Trainer

steps, repeats = 6, int(sys.argv[1]) if len(sys.argv) > 1 else 5
with tempfile.TemporaryDirectory() as tmp:
    shards = build_synthetic(tmp, 40, seed=0, val_fraction=0.2, min_size=64, max_size=128, samples_per_shard=16, progress=False)["train"].directory
    cfg = load_config(RunConfig, None, [f"run_dir={tmp}/run", f"data.train_shards={shards}", "data.val_shards=null", "data.backend=pil",
        "data.num_workers=0", "data.image_shorter=128", "data.image_max=192", "model.preset=pixelbert-r50", "train.micro_batch=2",
        "train.precision=fp32", "train.max_steps=1000000", "train.save_every=0", "train.export=false", "train.resume=none"])
    trainer = Trainer(cfg, "/work/main/deepspeed_configs/zero2.json")
    it = iter(trainer.train_loader)
    batches = [next(it) for _ in range(steps)]
    engine, bar = trainer.engine, Progress("x", 10**6, 0, enabled=False)
    def bare():
        for b in batches:
            out = engine(to_device(b, trainer.device, trainer.dtype)); engine.backward(out["loss"]); engine.step()
    def bare_fn():  # bare, but out freed before the next forward, as in the trainer
        def one(b):
            out = engine(to_device(b, trainer.device, trainer.dtype)); engine.backward(out["loss"]); engine.step()
        for b in batches: one(b)
    def tmb():
        for b in batches: trainer.train_micro_batch(b)
    def full():
        for b in batches:
            if trainer.train_micro_batch(b): trainer.finish_step(bar)
    loops = {"bare": bare, "bare_fn": bare_fn, "tmb": tmb, "full": full}
    clock = EngineClock(engine)
    eng = {k: [] for k in loops}
    names = list(loops)
    for r in range(1 + repeats):
        order = names[r % 4:] + names[:r % 4]
        for n in order:
            clock.reset(); s = time.perf_counter(); loops[n]()
            if r: eng[n].append(clock.seconds / steps * 1e3)
    base = median(eng["bare"])
    for n in names: print(n, round(median(eng[n])), f"{median(eng[n]) / base - 1:+.1%}", [round(x) for x in eng[n]], flush=True)
