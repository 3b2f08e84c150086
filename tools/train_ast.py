"""Train the AST-style reference classifier on the Free Spoken Digit Dataset; export it.

    nice -n 15 python tools/train_ast.py      # → models/ast_fsdd.onnx (+ .json)

Features: 64-band log-mel, 25 ms window, 10 ms hop, 96 frames (0.96 s; longer clips
cropped, shorter padded with silence), from onnxprune.datasets.load_fsdd. Split: test =
recordings with index 0–4 (the usual FSDD split); of the rest, index 5–9 is the
validation split that picks the best epoch, index 10–49 is trained on. Augmentation:
random time shift, SpecAugment masks, label smoothing. Test accuracy is measured on the
exported file in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch
from _common import (
    REPO,
    Clock,
    command_line,
    default_data_dir,
    print_row,
    require,
    seed_everything,
    write_json,
)
from torch import nn

from models.ast import AST, ASTConfig
from models.patchtst import count_parameters, export_onnx, set_fused_attention
from onnxprune.datasets import AudioSet, LogMelConfig, load_fsdd

FEATURES = LogMelConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=REPO / "models" / "ast_fsdd.onnx")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--max-steps", type=int, help="cap on training steps per epoch")
    p.add_argument("--max-minutes", type=float, default=26.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def augment(x: np.ndarray, rng: np.random.Generator, floor: float) -> np.ndarray:
    """Random time shift (silence fill) and SpecAugment: 2 frequency and 2 time masks."""
    out = np.full_like(x, floor)
    n, _, n_mels, n_frames = x.shape
    for i in range(n):
        shift = int(rng.integers(-8, 9))
        if shift >= 0:
            out[i, :, :, shift:] = x[i, :, :, : n_frames - shift]
        else:
            out[i, :, :, :shift] = x[i, :, :, -shift:]
        for _ in range(2):
            w = int(rng.integers(0, 9))
            f0 = int(rng.integers(0, n_mels - w + 1))
            out[i, :, f0 : f0 + w, :] = floor
            w = int(rng.integers(0, 11))
            t0 = int(rng.integers(0, n_frames - w + 1))
            out[i, :, :, t0 : t0 + w] = floor
    return out


@torch.no_grad()
def accuracy(model: nn.Module, data: AudioSet, batch: int = 128) -> float:
    model.eval()
    preds = [
        model(torch.from_numpy(data.features[i : i + batch])).argmax(-1).numpy()
        for i in range(0, len(data.labels), batch)
    ]
    return float((np.concatenate(preds) == data.labels).mean())


def onnx_predictions(path: Path, data: AudioSet, batch: int = 128) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            sess.run(["logits"], {"x": data.features[i : i + batch]})[0].argmax(-1)
            for i in range(0, len(data.labels), batch)
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed, args.threads)
    clock = Clock()
    train_all, test = load_fsdd(require(args.data_dir / "fsdd-recordings.tar.gz"), FEATURES)
    is_val = (train_all.indices >= 5) & (train_all.indices < 10)
    train, val = train_all.subset(~is_val), train_all.subset(is_val)
    cfg = ASTConfig(n_mels=FEATURES.n_mels, n_frames=FEATURES.n_frames)
    model = AST(cfg, mean=float(train.features.mean()), std=float(train.features.std()))
    set_fused_attention(model, True)
    n_params = count_parameters(model)
    print(
        f"FSDD: {len(train.labels)} train / {len(val.labels)} val / {len(test.labels)} test clips; "
        f"{n_params:,} parameters; features loaded in {clock.elapsed():.0f} s"
    )
    floor = float(np.log(FEATURES.log_floor))
    steps = math.ceil(len(train.labels) / args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=steps * args.epochs, pct_start=0.1
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    rng = np.random.default_rng(args.seed)
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    history, bad, stopped = [], 0, ""
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        order = rng.permutation(len(train.labels))
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb = torch.from_numpy(augment(train.features[idx], rng, floor))
            loss = loss_fn(model(xb), torch.from_numpy(train.labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
        row = {
            "epoch": epoch,
            "train_loss": total / steps,
            "val_acc": accuracy(model, val),
            "test_acc": accuracy(model, test),
            "elapsed_s": round(clock.elapsed(), 1),
        }
        history.append(row)
        print_row(row)
        if row["val_acc"] > best["val_acc"]:
            best, bad = (
                {
                    "val_acc": row["val_acc"],
                    "epoch": epoch,
                    "state": copy.deepcopy(model.state_dict()),
                },
                0,
            )
        else:
            bad += 1
            if bad >= args.patience:
                stopped = f"early stop: val accuracy did not improve for {args.patience} epochs"
                break
        if args.max_minutes and clock.elapsed() / 60 * (epoch + 1) / epoch > args.max_minutes:
            stopped = f"time budget: another epoch would pass {args.max_minutes} min"
            break
    train_time = clock.elapsed()
    model.load_state_dict(best["state"])
    export_onnx(model, args.out, input_shape=(1, cfg.n_mels, cfg.n_frames), output_name="logits")
    pred = onnx_predictions(args.out, test)
    confusion = np.zeros((cfg.n_classes, cfg.n_classes), np.int64)
    np.add.at(confusion, (test.labels, pred), 1)
    metrics = {
        "model": args.out.name,
        "data": "FSDD (fsdd-recordings.tar.gz), test = index 0-4",
        "test_accuracy": float((pred == test.labels).mean()),
        "val_accuracy": best["val_acc"],
        "metric_note": "test accuracy measured on the ONNX file in ONNX Runtime",
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped": stopped,
        "confusion_test": confusion.tolist(),
        "parameters": n_params,
        "seed": args.seed,
        "threads": args.threads,
        "train_wall_s": round(train_time, 1),
        "wall_s": round(clock.elapsed(), 1),
        "command": command_line(),
        "features": vars(FEATURES),
        "config": cfg.to_dict(),
        "history": history,
        "train_split": "index 10-49",
        "val_split": "index 5-9",
    }
    write_json(args.out.with_suffix(".json"), metrics)
    print(
        f"best epoch {best['epoch']}; ONNX test accuracy {metrics['test_accuracy']:.4f}; "
        f"wrote {args.out}"
    )
    return metrics


if __name__ == "__main__":
    main()
