"""The training loop shared by train_patchtst.py and train_tsfm.py (forecasters on windows)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

Batches = Callable[[np.random.Generator], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    pct_start: float = 0.3
    patience: int = 3
    max_steps_per_epoch: int | None = None
    max_minutes: float | None = None
    eval_batch: int = 256
    seed: int = 0


@dataclass
class TrainResult:
    best_epoch: int
    best_val: float
    history: list[dict] = field(default_factory=list)
    stopped: str = ""


def iterate(x: np.ndarray, y: np.ndarray, batch: int, rng: np.random.Generator | None):
    """Batches of (x, y) copies; shuffled when ``rng`` is given."""
    order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
    for i in range(0, len(order), batch):
        idx = np.sort(order[i : i + batch]) if rng is None else order[i : i + batch]
        yield np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> dict[str, float]:
    model.eval()
    sq, ab, n = 0.0, 0.0, 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))
        yb = torch.from_numpy(np.ascontiguousarray(y[i : i + batch]))
        pred = model(xb)
        sq += float(((pred - yb) ** 2).sum())
        ab += float((pred - yb).abs().sum())
        n += yb.numel()
    return {"mse": sq / n, "mae": ab / n}


def train(
    model: nn.Module,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    test_xy: tuple[np.ndarray, np.ndarray] | None,
    s: TrainSettings,
    clock,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Adam + OneCycle on MSE, early stopping on val MSE; leaves the best weights in ``model``."""
    n_train = len(train_xy[0])
    steps = math.ceil(n_train / s.batch_size)
    if s.max_steps_per_epoch:
        steps = min(steps, s.max_steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=s.lr, total_steps=steps * s.epochs, pct_start=s.pct_start
    )
    rng = np.random.default_rng(s.seed)
    result = TrainResult(best_epoch=-1, best_val=math.inf)
    best_state, bad = None, 0
    for epoch in range(1, s.epochs + 1):
        model.train()
        total = 0.0
        for step, (xb, yb) in enumerate(iterate(*train_xy, s.batch_size, rng)):
            if step >= steps:
                break
            loss = nn.functional.mse_loss(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        row = {"epoch": epoch, "train_mse": total / steps, "lr": sched.get_last_lr()[0]}
        row.update({f"val_{k}": v for k, v in evaluate(model, *val_xy, s.eval_batch).items()})
        if test_xy is not None:
            row.update({f"test_{k}": v for k, v in evaluate(model, *test_xy, s.eval_batch).items()})
        row["elapsed_s"] = round(clock.elapsed(), 1)
        result.history.append(row)
        log(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
        if row["val_mse"] < result.best_val:
            result.best_val, result.best_epoch, bad = row["val_mse"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= s.patience:
                result.stopped = f"early stop: val MSE did not improve for {s.patience} epochs"
                break
        if s.max_minutes and clock.elapsed() / 60 * (epoch + 1) / epoch > s.max_minutes:
            result.stopped = f"time budget: another epoch would pass {s.max_minutes} min"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
