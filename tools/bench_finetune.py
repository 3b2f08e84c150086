"""One fine-tuning step through ONNX Runtime vs the same step in torch, and training memory.

    python tools/bench_finetune.py [--batch 32] [--steps 10] [--threads 2]

Model: the reference PatchTST (models/patchtst_etth1.onnx; its torch definition with the
same config for the torch side), ETTh1 training windows from ../shared/data. A step is
forward + backward + AdamW on every weight. Times are medians over --steps steps after two
warm-up steps, both sides with the same thread count. Memory: peak resident set of a child
process that (a) runs inference sessions of the model at the batch, (b) runs fine-tuning
steps; the optimiser state (2 floats per weight) is printed beside them. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def windows(batch: int) -> tuple[np.ndarray, np.ndarray]:
    from onnxprune.datasets import load_windows

    series = load_windows(REPO.parent / "shared" / "data" / "ETTh1.csv")
    return series.batch("train", np.arange(batch * 4))


def onnx_step_times(batch: int, steps: int, threads: int) -> list[float]:
    import onnx

    from onnxprune.data import CalibrationData
    from onnxprune.finetune import AdamW, FinetuneOptions, Trainer, trainable_weights
    from onnxprune.losses import choose_loss, target_feeds

    model = onnx.load(str(REPO / "models" / "patchtst_etth1.onnx"))
    x, y = windows(batch)
    data = CalibrationData({"x": x}, {"y": y}, "ETTh1", False)
    spec = choose_loss(model, data.targets)
    names = trainable_weights(model, FinetuneOptions(steps=1))
    trainer = Trainer(model, spec, names, threads, {"x": x[:2]}, batch)
    opt = AdamW(trainer.weights, 1e-4, 0.01)
    times = []
    for step in range(steps + 2):
        lo = (step % 4) * batch
        inputs = {"x": x[lo:lo + batch]}
        targets = target_feeds(spec, {"y": y[lo:lo + batch]})
        start = time.perf_counter()
        _, grads = trainer.step(inputs, targets)
        opt.update(trainer.weights, grads, 1e-4)
        times.append(time.perf_counter() - start)
    return times[2:]


def torch_step_times(batch: int, steps: int, threads: int) -> list[float]:
    import torch

    from models.patchtst import PatchTST, PatchTSTConfig, set_fused_attention

    torch.set_num_threads(threads)
    cfg = json.loads((REPO / "models" / "patchtst_etth1.json").read_text())["config"]
    model = PatchTST(PatchTSTConfig(**cfg))
    set_fused_attention(model, False)   # the same explicit attention the ONNX file has
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in windows(batch))
    times = []
    for step in range(steps + 2):
        lo = (step % 4) * batch
        start = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[lo:lo + batch]), y[lo:lo + batch])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[2:]


def _peak(kind: str, batch: int, threads: int, queue) -> None:
    import onnx

    from onnxprune.runtime import make_session

    x, _ = windows(batch)
    model = onnx.load(str(REPO / "models" / "patchtst_etth1.onnx"))
    if kind == "inference":
        session = make_session(model, threads=threads)
        for _ in range(3):
            session.run(None, {"x": x[:batch]})
    else:
        onnx_step_times(batch, 2, threads)
    queue.put(vm_hwm_mb())


def vm_hwm_mb() -> float:
    """Peak resident set of this process image (VmHWM; unlike ru_maxrss it does not carry
    the parent's peak across the fork+exec of a spawned child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb(kind: str, batch: int, threads: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak, args=(kind, batch, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    onnx_t = statistics.median(onnx_step_times(args.batch, args.steps, args.threads))
    torch_t = statistics.median(torch_step_times(args.batch, args.steps, args.threads))
    import onnx

    model = onnx.load(str(REPO / "models" / "patchtst_etth1.onnx"))
    n_weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    optimiser_mb = 2 * 4 * n_weights / 2**20
    infer_mb = peak_mb("inference", args.batch, args.threads)
    train_mb = peak_mb("train", args.batch, args.threads)
    print("| model | batch | threads | ONNX Runtime step (ms) | torch step (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| patchtst_etth1 | {args.batch} | {args.threads} | {onnx_t * 1e3:.1f} | "
          f"{torch_t * 1e3:.1f} | {onnx_t / torch_t:.2f}x |")
    print()
    print("| peak RSS, inference process (MB) | peak RSS, fine-tuning process (MB) | "
          "optimiser state (MB) | fine-tuning / (inference + optimiser) |")
    print("|---|---|---|---|")
    print(f"| {infer_mb:.0f} | {train_mb:.0f} | {optimiser_mb:.1f} | "
          f"{train_mb / (infer_mb + optimiser_mb):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
