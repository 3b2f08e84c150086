"""Write calibration / evaluation ``.npz`` files for the reference models.

    python tools/make_data.py                      # → data/*.npz (data/ is git-ignored)
    python tools/make_data.py --only etth1 --out /tmp/calib

ETT (models/patchtst_etth1.onnx, tsfm_small.onnx, patchtst_etth2.onnx; input ``x``,
output ``y``): ``etth1_{train,val,test}.npz`` and ``etth2_test.npz`` hold ``x`` [N, 336, 7]
and ``y`` [N, 96, 7] float32, standardised with a scaler fitted on the file's own train
rows, ETT split (train rows 0-8639, val 8640-11519, test 11520-14399; a window belongs to
the split that holds its forecast), exactly as tools/train_patchtst.py trained and tested.

FSDD (models/ast_fsdd.onnx; input ``x``, output ``logits``): ``fsdd_{train,test}.npz``
hold ``x`` [N, 1, 64, 96] float32 log-mel features (default LogMelConfig, as
tools/train_ast.py) and ``logits`` int64 class ids [N] (cross-entropy targets). Test =
recordings with index 0-4; train = every other recording (index 5-49, i.e. the training
script's train and validation splits together).

Each file is a calibration file for ``onnxprune ... --calib FILE``: keys are the model's
input and output names (checked against the model files when they are present). Files
are written compressed (overlapping ETT windows shrink from 95 MiB to 1 MiB and load as
fast); ``--uncompressed`` writes plain ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from onnxprune.data import write_calibration  # noqa: E402
from onnxprune.datasets import LogMelConfig, load_fsdd, load_windows  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402

GROUPS = ("etth1", "etth2", "fsdd")
LOOKBACK, HORIZON = 336, 96


def default_data_dir() -> Path:
    """``$ONNXPRUNE_DATA`` or ``../shared/data`` relative to the repository root."""
    return Path(os.environ.get("ONNXPRUNE_DATA", REPO.parent / "shared" / "data"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="folder with ETTh1.csv, ETTh2.csv, fsdd-recordings.tar.gz "
                   "(default: $ONNXPRUNE_DATA or ../shared/data)")
    p.add_argument("--out", type=Path, default=REPO / "data", help="output folder (default data/)")
    p.add_argument("--only", default=",".join(GROUPS),
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: all)")
    p.add_argument("--uncompressed", dest="compress", action="store_false",
                   help="write plain .npz files (default: compressed; overlapping ETT windows "
                   "shrink about 100x and load as fast)")
    args = p.parse_args(argv)
    args.only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown or not args.only:
        p.error(f"--only: unknown group(s) {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(GROUPS)}")
    return args


def model_names(model: str, default_in: str, default_out: str) -> tuple[str, str]:
    """(input name, output name) of models/<model>, or the defaults when it is absent."""
    path = REPO / "models" / model
    if not path.exists():
        return default_in, default_out
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    outputs = [o.name for o in m.graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        sys.exit(f"error: {path}: expected one input and one output, got {inputs} -> {outputs}")
    return inputs[0], outputs[0]


def write(path: Path, arrays: dict[str, np.ndarray], inputs: list[str], compress: bool) -> Path:
    if not compress:
        return write_calibration(path, {k: arrays[k] for k in inputs},
                                 {k: v for k, v in arrays.items() if k not in inputs})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def report(path: Path, arrays: dict[str, np.ndarray], seconds: float) -> None:
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items())
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {seconds:.1f} s): {shapes}", flush=True)


def make_ett(name: str, splits: tuple[str, ...], args: argparse.Namespace, model: str) -> None:
    x_name, y_name = model_names(model, "x", "y")
    start = time.perf_counter()
    series = load_windows(args.data_dir / f"{name.replace('etth', 'ETTh')}.csv",
                          lookback=LOOKBACK, horizon=HORIZON)
    for split in splits:
        x, y = series.windows(split)
        arrays = {x_name: np.ascontiguousarray(x, np.float32),
                  y_name: np.ascontiguousarray(y, np.float32)}
        path = write(args.out / f"{name}_{split}.npz", arrays, [x_name], args.compress)
        report(path, arrays, time.perf_counter() - start)
        start = time.perf_counter()


def make_fsdd(args: argparse.Namespace) -> None:
    x_name, y_name = model_names("ast_fsdd.onnx", "x", "logits")
    start = time.perf_counter()
    train, test = load_fsdd(args.data_dir / "fsdd-recordings.tar.gz", LogMelConfig())
    load_s = time.perf_counter() - start
    for split, audio in (("train", train), ("test", test)):
        start = time.perf_counter()
        arrays = {x_name: np.ascontiguousarray(audio.features, np.float32),
                  y_name: audio.labels.astype(np.int64)}
        path = write(args.out / f"fsdd_{split}.npz", arrays, [x_name], args.compress)
        report(path, arrays, time.perf_counter() - start + load_s)
        load_s = 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if "etth1" in args.only:
            make_ett("etth1", ("train", "val", "test"), args, "patchtst_etth1.onnx")
        if "etth2" in args.only:
            make_ett("etth2", ("test",), args, "patchtst_etth2.onnx")
        if "fsdd" in args.only:
            make_fsdd(args)
    except OnnxpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
