"""Train the PatchTST-style reference forecaster on ETTh1 (or ETTh2) and export it to ONNX.

    nice -n 15 python tools/train_patchtst.py                 # ETTh1 → models/patchtst_etth1.onnx
    nice -n 15 python tools/train_patchtst.py --data ETTh2    # ETTh2 → models/patchtst_etth2.onnx

Lookback 336, horizon 96, standardised data (scaler fitted on the train rows). An epoch is
--max-steps (40) Adam steps of 128 windows drawn without replacement from the 8,209 train
windows (62% of them), under a OneCycle schedule over all epochs. Prints
train/val/test MSE per epoch, keeps the weights of the best validation epoch, exports
them (dynamic batch, one file) and writes the metrics JSON beside the ONNX file. The
test metrics in the JSON are measured on the exported file in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from _common import (
    REPO,
    Clock,
    command_line,
    default_data_dir,
    onnx_forecast_metrics,
    require,
    seed_everything,
    write_json,
)
from forecast_train import TrainSettings, train

from models.patchtst import (
    PatchTST,
    PatchTSTConfig,
    count_parameters,
    export_onnx,
    set_fused_attention,
)
from onnxprune.datasets import load_windows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="ETTh1", help="CSV name without .csv (ETTh1, ETTh2)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, help="ONNX path (default models/patchtst_<data>.onnx)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of OneCycle")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--norm", choices=["layernorm", "batchnorm"], default="layernorm")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=40, help="training steps per epoch (cap)")
    p.add_argument(
        "--max-minutes", type=float, default=26.0, help="stop before an epoch that would pass this"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-test-per-epoch", action="store_true", help="skip the per-epoch test pass")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed, args.threads)
    clock = Clock()
    out = args.out or REPO / "models" / f"patchtst_{args.data.lower()}.onnx"
    series = load_windows(require(args.data_dir / f"{args.data}.csv"), lookback=336, horizon=96)
    cfg = PatchTSTConfig(n_channels=len(series.columns), dropout=args.dropout, norm=args.norm)
    model = PatchTST(cfg)
    set_fused_attention(model, True)
    n_params = count_parameters(model)
    print(f"{args.data}: {len(series.starts('train'))} train windows, {n_params:,} parameters")
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        max_steps_per_epoch=args.max_steps,
        max_minutes=args.max_minutes,
        seed=args.seed,
    )
    test = None if args.no_test_per_epoch else series.windows("test")
    result = train(model, series.windows("train"), series.windows("val"), test, settings, clock)
    train_time = clock.elapsed()
    export_onnx(model, out)
    test_metrics = onnx_forecast_metrics(out, *series.windows("test"))
    val_metrics = onnx_forecast_metrics(out, *series.windows("val"))
    metrics = {
        "model": out.name,
        "data": args.data,
        "lookback": 336,
        "horizon": 96,
        "test_mse": test_metrics["mse"],
        "test_mae": test_metrics["mae"],
        "val_mse": val_metrics["mse"],
        "val_mae": val_metrics["mae"],
        "metric_note": "standardised data (train-fitted scaler), measured on the ONNX file",
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "parameters": n_params,
        "seed": args.seed,
        "threads": args.threads,
        "train_wall_s": round(train_time, 1),
        "wall_s": round(clock.elapsed(), 1),
        "command": command_line(),
        "config": cfg.to_dict(),
        "settings": asdict(settings),
        "history": result.history,
    }
    write_json(out.with_suffix(".json"), metrics)
    print(
        f"best epoch {result.best_epoch}; ONNX test MSE {test_metrics['mse']:.4f} "
        f"MAE {test_metrics['mae']:.4f}; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)"
    )
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
