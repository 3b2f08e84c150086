"""Pre-train the small time-series foundation model, or fine-tune it on ETTh1.

    nice -n 15 python tools/train_tsfm.py pretrain   # → models/tsfm_small.{onnx,json}
    nice -n 15 python tools/train_tsfm.py finetune   # full fine-tuning on ETTh1, fixed budget

The pretrain phase also keeps its torch weights in runs/tsfm_small.pt (git-ignored), which
the finetune phase starts from.

Pre-training mixes ETTh2 windows (rows before its test split) with generated series
(seasonal, trend, AR, random walk, regime switches); ETTh1 is never seen. Every sample is
one univariate series, scaled by its lookback mean and std (the model's RevIN makes that
exact for its inputs; it puts every series' loss on one scale). The pre-trained model is
exported and evaluated zero-shot on the ETTh1 test split (standardised, horizon 96).

Fine-tuning trains all weights on ETTh1 train windows for a fixed budget (--steps
optimizer steps of --batch-size windows × 7 channels), then measures ETTh1 test MSE.
Its results go into the ``finetune`` entry of models/tsfm_small.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _common import (
    REPO,
    Clock,
    command_line,
    default_data_dir,
    onnx_forecast_metrics,
    print_row,
    require,
    seed_everything,
    write_json,
)
from forecast_train import evaluate, iterate
from torch import nn

from models.patchtst import count_parameters, export_onnx, set_fused_attention
from models.tsfm import build_tsfm, tsfm_config
from onnxprune.datasets import ETT_SPLITS, load_windows
from onnxprune.datasets.synthetic import SyntheticConfig, generate

LOOKBACK, HORIZON = 336, 96
CHECKPOINT = REPO / "runs" / "tsfm_small.pt"
ONNX_PATH = REPO / "models" / "tsfm_small.onnx"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["pretrain", "finetune"])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--steps", type=int, help="optimizer steps (pretrain 400, finetune 100)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="pretrain: univariate series per step (128); finetune: 7-channel windows (32)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (pretrain 5e-4, finetune 1e-4)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up")
    p.add_argument("--synthetic-frac", type=float, default=0.5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--out", type=Path, default=ONNX_PATH)
    p.add_argument("--eval-windows", type=int, help="evaluate on the first N windows (smoke runs)")
    args = p.parse_args(argv)
    pre = args.phase == "pretrain"
    args.steps = args.steps or (400 if pre else 100)
    args.batch_size = args.batch_size or (128 if pre else 32)
    args.lr = args.lr or (5e-4 if pre else 1e-4)
    return args


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float):
    n_warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def head(xy: tuple[np.ndarray, np.ndarray], n: int | None) -> tuple[np.ndarray, np.ndarray]:
    return xy if n is None else (xy[0][:n], xy[1][:n])


def scale_by_lookback(series: np.ndarray) -> np.ndarray:
    """[N, L+H] → same, minus the lookback mean, over the lookback std; clipped to ±10."""
    look = series[:, :LOOKBACK]
    z = (series - look.mean(1, keepdims=True)) / (look.std(1, keepdims=True) + 1e-3)
    return np.clip(z, -10, 10).astype(np.float32)


class Mixture:
    """Pre-training batches: ETTh2 univariate windows and generated series."""

    def __init__(self, data_dir: Path, synthetic_frac: float, rng: np.random.Generator) -> None:
        ett2 = load_windows(require(data_dir / "ETTh2.csv"), LOOKBACK, HORIZON)
        rows = ett2.data[: ETT_SPLITS.val_end]  # train + val rows; ETTh2 test stays held out
        size = LOOKBACK + HORIZON
        self.real = np.lib.stride_tricks.sliding_window_view(rows, size, axis=0)  # [N, C, size]
        self.frac = synthetic_frac
        self.rng = rng
        self.synthetic = SyntheticConfig(length=size)
        self.heldout = ett2

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_syn = round(n * self.frac)
        starts = self.rng.integers(0, self.real.shape[0], n - n_syn)
        chans = self.rng.integers(0, self.real.shape[1], n - n_syn)
        series = np.concatenate(
            [self.real[starts, chans], generate(n_syn, self.rng, self.synthetic)]
        )
        z = torch.from_numpy(scale_by_lookback(series))[:, :, None]  # [n, L+H, 1]
        return z[:, :LOOKBACK], z[:, LOOKBACK:]


def pretrain(args: argparse.Namespace) -> dict:
    clock = Clock()
    rng = np.random.default_rng(args.seed)
    mix = Mixture(args.data_dir, args.synthetic_frac, rng)
    model = build_tsfm(dropout=args.dropout)
    set_fused_attention(model, True)
    print(
        f"pretrain: {count_parameters(model):,} parameters, "
        f"{args.steps} steps × {args.batch_size} series"
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = warmup_cosine(opt, args.steps, args.warmup)
    ho_x, ho_y = mix.heldout.windows("test")
    probe = np.random.default_rng(1).choice(len(ho_x), 128, replace=False)
    history, running, done, logged = [], 0.0, 0, 0
    for step in range(1, args.steps + 1):
        model.train()
        x, y = mix.batch(args.batch_size)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        done = step
        if step % 50 == 0 or step == args.steps:
            held = evaluate(model, ho_x[probe], ho_y[probe])
            row = {
                "step": step,
                "train_mse": running / (step - logged),
                "etth2_test_probe_mse": held["mse"],
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(clock.elapsed(), 1),
            }
            history.append(row)
            print_row(row)
            running, logged = 0.0, step
            if args.max_minutes and clock.elapsed() / 60 * (step + 50) / step > args.max_minutes:
                print(f"time budget: stopping at step {step} of {args.steps}")
                break
    train_time = clock.elapsed()
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.checkpoint)
    export_onnx(model, args.out)
    ett1 = load_windows(require(args.data_dir / "ETTh1.csv"), LOOKBACK, HORIZON)
    zero_shot = onnx_forecast_metrics(args.out, *head(ett1.windows("test"), args.eval_windows))
    etth2 = onnx_forecast_metrics(args.out, *head((ho_x, ho_y), args.eval_windows))
    metrics = {
        "model": args.out.name,
        "phase": "pretrain",
        "pretrain_data": "ETTh2 rows 0-11519 (its train+val) + generated series "
        f"(fraction {args.synthetic_frac}); no ETTh1",
        "zero_shot_etth1_test_mse": zero_shot["mse"],
        "zero_shot_etth1_test_mae": zero_shot["mae"],
        "etth2_test_mse": etth2["mse"],
        "etth2_test_mae": etth2["mae"],
        "metric_note": "standardised (train-fitted scaler), horizon 96, measured on the ONNX file",
        "steps": done,
        "batch_size_series": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "parameters": count_parameters(model),
        "seed": args.seed,
        "threads": args.threads,
        "train_wall_s": round(train_time, 1),
        "wall_s": round(clock.elapsed(), 1),
        "command": command_line(),
        "config": tsfm_config(dropout=args.dropout).to_dict(),
        "history": history,
    }
    write_json(args.out.with_suffix(".json"), metrics)
    print(
        f"zero-shot ETTh1 test MSE {zero_shot['mse']:.4f} MAE {zero_shot['mae']:.4f}; "
        f"ETTh2 test MSE {etth2['mse']:.4f}; wrote {args.out}"
    )
    return metrics


def finetune(args: argparse.Namespace) -> dict:
    clock = Clock()
    if not args.checkpoint.exists():
        sys.exit(
            f"error: {args.checkpoint} not found; run `python tools/train_tsfm.py pretrain` first"
        )
    model = build_tsfm(dropout=args.dropout)
    model.load_state_dict(torch.load(args.checkpoint))
    set_fused_attention(model, True)
    ett1 = load_windows(require(args.data_dir / "ETTh1.csv"), LOOKBACK, HORIZON, splits=ETT_SPLITS)
    train_x, train_y = ett1.windows("train")
    test_xy = head(ett1.windows("test"), args.eval_windows)
    meta_path = args.out.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    before = {"mse": meta.get("zero_shot_etth1_test_mse", float("nan"))}
    print(
        f"finetune: {args.steps} steps × {args.batch_size} windows; "
        f"zero-shot test MSE {before['mse']:.4f}"
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = warmup_cosine(opt, args.steps, args.warmup)
    rng = np.random.default_rng(args.seed)
    step, running = 0, 0.0
    while step < args.steps:
        for xb, yb in iterate(train_x, train_y, args.batch_size, rng):
            model.train()
            loss = nn.functional.mse_loss(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if step % 25 == 0:
                print(
                    f"step={step} train_mse={running / 25:.4f} elapsed_s={clock.elapsed():.0f}",
                    flush=True,
                )
                running = 0.0
            if step >= args.steps:
                break
    train_time = clock.elapsed()
    val = evaluate(model, *head(ett1.windows("val"), args.eval_windows))
    test = evaluate(model, *test_xy)
    result = {
        "budget": {
            "steps": args.steps,
            "batch_size_windows": args.batch_size,
            "channels": 7,
            "windows_seen": args.steps * args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "optimizer": "Adam, warm-up + cosine, grad clip 1.0",
            "dropout": args.dropout,
        },
        "zero_shot_test_mse": before["mse"],
        "test_mse": test["mse"],
        "test_mae": test["mae"],
        "val_mse": val["mse"],
        "val_mae": val["mae"],
        "seed": args.seed,
        "train_wall_s": round(train_time, 1),
        "wall_s": round(clock.elapsed(), 1),
        "command": command_line(),
        "splits": asdict(ETT_SPLITS),
    }
    meta["finetune_etth1"] = result
    write_json(meta_path, meta)
    print(
        f"fine-tuned ETTh1 test MSE {test['mse']:.4f} MAE {test['mae']:.4f} "
        f"(zero-shot {before['mse']:.4f}); updated {meta_path}"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed, args.threads)
    return pretrain(args) if args.phase == "pretrain" else finetune(args)


if __name__ == "__main__":
    main()
