"""Bad input never ends in a traceback (issue 15): every case below exits 2 with exactly one
line on stderr, "onnxprune: error: ...", and leaves every file as it was (nothing written,
nothing modified). Fixtures are tiny hand-built graphs (opgraphs), written into tmp_path.

Also: ``--method stat`` scores parallel (GPT-J style) blocks and blocks without a residual
add, and a closed stdout (``onnxprune inspect m.onnx | head -1``) ends quietly.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from opgraphs import BATCH, HEAD_DIM, SEQ, WIDTH, Builder, attention_model, heads_split

from onnxprune.cli import EXIT_BROKEN_PIPE, main

REPO = Path(__file__).resolve().parents[2]
PATCHTST = str(REPO / "models" / "patchtst_etth1.onnx")


def _save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, path)
    return str(path)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _model(tmp: Path, edit=None, name: str = "m.onnx") -> str:
    """The one-block attention model, changed by ``edit(model)`` if given."""
    model = attention_model()
    if edit:
        edit(model)
    return _save(model, tmp / name)


def _set_value(name: str, index: tuple, value: float):
    def edit(model: onnx.ModelProto) -> None:
        for i, t in enumerate(model.graph.initializer):
            if t.name == name:
                array = numpy_helper.to_array(t).copy()
                array[index] = value
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
    return edit


def _external(tmp: Path, location: str, folder: str = "ext") -> str:
    """The model with its weights in an external file at ``location`` (as recorded in the
    model); the data file itself is written as ``ext/m.onnx.data``."""
    (tmp / "ext").mkdir(exist_ok=True)
    onnx.save(_copy(attention_model()), tmp / "ext" / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    model = onnx.load(tmp / "ext" / "m.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (tmp / folder).mkdir(exist_ok=True, parents=True)
    return _save(model, tmp / folder / "model.onnx")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\0" * 64


def _npz(tmp: Path, name: str = "c.npz", **arrays) -> str:
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


def _write(tmp: Path, name: str, content: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def _x(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, SEQ, WIDTH)).astype(np.float32)


# --- the cases: id -> tmp_path -> argv (OUT is tmp_path / "out.onnx"); message substring --

def _ext_missing(t):
    path = _external(t, "m.onnx.data", folder="alone")
    return ["inspect", path]


def _ext_symlink(t):
    _external(t, "m.onnx.data")
    path = _external(t, "link.data", folder="linked")
    (t / "linked" / "link.data").symlink_to(t / "ext" / "m.onnx.data")
    return ["inspect", path]


def _huge_dim(t):
    def edit(model):
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 10 ** 9
    return ["inspect", _model(t, edit)]


def _no_data(t):
    def edit(model):
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
    return ["inspect", _model(t, edit)]


def _npz_huge_header(t):
    with zipfile.ZipFile(t / "c.npz", "w") as z:
        z.writestr("x.npy", _npy_header((10 ** 12, 336, 7)))
    return ["score", _model(t), "--calib", str(t / "c.npz"), "--quiet"]


def _npy_huge_header(t):
    return ["score", _model(t), "--calib", _write(t, "c.npy", _npy_header((10 ** 12, 3, 8))),
            "--quiet"]


def _no_outputs(t):
    def edit(model):
        del model.graph.output[:]
    return ["cut", _model(t, edit), str(t / "out.onnx"), "--remove", "attn0.head1"]


def _opset(version):
    def case(t):
        def edit(model):
            model.opset_import[0].version = version
        return ["inspect", _model(t, edit)]
    return case


def _ir_version(t):
    def edit(model):
        model.ir_version = 99
    return ["inspect", _model(t, edit)]


def _cut(edit, units="attn0.head1"):
    return lambda t: ["cut", _model(t, edit), str(t / "out.onnx"), "--remove", units]


def _prune(*extra):
    return lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "0.3", "--method",
                      "magnitude", "--quiet", *extra]


def _score(*extra):
    return lambda t: ["score", _model(t), "--method", "magnitude", "--quiet", *extra]


def _calib(make):
    return lambda t: ["score", _model(t), "--quiet", "--calib", make(t)]


def _patchtst_csv(text):
    return lambda t: ["score", PATCHTST, "--quiet", "--calib", _write(t, "d.csv", text)]


_ROWS = "".join(f"2020-01-01,{','.join('x' * 7)}\n" for _ in range(600))

CASES = {
    # external data onnx refuses to read (its ValidationError escaped)
    "external data missing": (_ext_missing, "external weight file missing"),
    "external data outside the folder": (
        lambda t: ["inspect", _external(t, "../ext/m.onnx.data", folder="sub")],
        "outside the model's folder"),
    "external data absolute": (
        lambda t: ["inspect", _external(t, str(t / "ext" / "m.onnx.data"), folder="abs")],
        "absolute path"),
    "external data through a symlink": (_ext_symlink, "symbolic link"),
    # declared sizes that cannot fit: refused before anything is allocated
    "input dim of 10^9": (_huge_dim, "synthetic input x [2, 1000000000, 8]"),
    "initializer with dims but no data": (_no_data, "declares dims [8, 8] (64 values)"),
    "npz header of 10^12 rows": (_npz_huge_header, "declares shape (1000000000000, 336, 7)"),
    "npy header of 10^12 rows": (_npy_huge_header, "declares shape (1000000000000, 3, 8)"),
    # non-finite weights: named, exit 2 (not "verification failed", exit 4)
    "NaN in a kept weight": (_cut(_set_value("o.W", (0, 0), np.nan)), "weight 'o.W'"),
    "inf in a weight": (_cut(_set_value("q.W", (1, 2), np.inf)), "weight 'q.W'"),
    "inf in a bias": (_cut(_set_value("o.b", (0,), np.inf)), "weight(s) 'o.b' hold NaN"),
    # models ONNX Runtime refuses with its log and C++ messages
    "no outputs": (_no_outputs, "declares no outputs"),
    "opset 99": (_opset(99), "opset 99"),
    "opset 0": (_opset(0), "opset 0"),
    "IR version 99": (_ir_version, "IR version 99"),
    # argument errors: one line, not argparse's usage block
    "missing argument": (lambda t: ["inspect"], "see onnxprune inspect --help"),
    "cut without --remove": (lambda t: ["cut", _model(t), str(t / "out.onnx")], "--remove"),
    "unknown option": (lambda t: ["inspect", _model(t), "--nope"], "--nope"),
    "unknown method": (_score("--method", "nope"), "invalid choice"),
    "main job without output": (lambda t: [_model(t)], "output"),
    # numbers: finite, in range
    "--max-drop nan": (_prune("--max-drop", "nan"), "--max-drop"),
    "--max-drop inf": (_prune("--max-drop", "inf"), "--max-drop"),
    "--max-drop negative": (_prune("--max-drop", "-0.1"), "--max-drop"),
    "--threads -1": (_prune("--threads", "-1"), "--threads"),
    "--seed -1": (_prune("--seed", "-1"), "--seed"),
    "--batch-size 0": (_score("--batch-size", "0"), "--batch-size"),
    "--samples 0": (_score("--samples", "0"), "--samples"),
    "--prune-steps 0": (_prune("--prune-steps", "0"), "--prune-steps"),
    "--round-to 0": (_prune("--round-to", "0"), "--round-to"),
    "score, nothing to score": (_score("--granularity", "ffn"), "nothing to prune"),
    "--ratio 0": (lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "0"], "--ratio"),
    "--ratio 1": (lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "1"], "--ratio"),
    "--ratio -1": (lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "-1"], "--ratio"),
    "--ratio abc": (lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "abc"], "--ratio"),
    "--ratio nan": (lambda t: [_model(t), str(t / "out.onnx"), "--ratio", "nan"], "--ratio"),
    "--ema nan": (_score("--ema", "nan"), "--ema"),
    "finetune --steps -3": (
        lambda t: ["finetune", _model(t), str(t / "out.onnx"), "--train",
                   _npz(t, x=_x()), "--steps", "-3"], "--steps"),
    "finetune --lr inf": (
        lambda t: ["finetune", _model(t), str(t / "out.onnx"), "--train",
                   _npz(t, x=_x()), "--steps", "1", "--lr", "inf"], "--lr"),
    "bench --runs 0": (lambda t: ["bench", _model(t), "--runs", "0"], "--runs"),
    "bench --warmup -1": (lambda t: ["bench", _model(t), "--warmup", "-1"], "--warmup"),
    "bench --batch 0": (lambda t: ["bench", _model(t), "--batch", "0"], "--batch"),
    # more bad files and names
    "not an ONNX file": (lambda t: ["inspect", _write(t, "m.onnx", "hello")],
                         "not a valid ONNX file"),
    "a folder as the model": (lambda t: ["inspect", str(t)], "is a directory"),
    "calibration .txt": (_calib(lambda t: _write(t, "c.txt", "1,2,3")),
                         "unsupported calibration file type"),
    "empty npz": (_calib(lambda t: _npz(t)), "no array for model input"),
    "npz with wrong keys": (_calib(lambda t: _npz(t, y=_x())), "file has y"),
    "npz with an extra key": (_calib(lambda t: _npz(t, x=_x(), z=np.zeros(4))),
                              "match no model input"),
    "npz with 0 rows": (_calib(lambda t: _npz(t, x=_x(0))), "0 rows"),
    "npz with NaN": (_calib(lambda t: _npz(t, x=np.full((4, SEQ, WIDTH), np.nan,
                                                         np.float32))), "NaN"),
    "npz of wrong shape": (_calib(lambda t: _npz(t, x=np.zeros((4, 5, WIDTH), np.float32))),
                           "dim 1 expected 3"),
    "npz of ints": (_calib(lambda t: _npz(t, x=np.zeros((4, SEQ, WIDTH), np.int64))),
                    "floating-point data needed"),
    "npz of objects": (_calib(lambda t: _npz(t, x=np.array([{}], dtype=object))),
                       "not a readable .npz"),
    "truncated npz": (_calib(lambda t: _write(t, "c.npz", b"PK\x03\x04" + b"\0" * 20)),
                      "not a readable .npz"),
    "csv without numbers": (_patchtst_csv("date,a,b,c,d,e,f,g\n" + _ROWS), "non-numeric"),
    "csv with a header only": (_patchtst_csv("date,a,b,c,d,e,f,g\n"), "rows"),
    "binary csv": (_patchtst_csv(bytes(range(256)).decode("latin-1")), "csv"),
    "unit of no block": (_cut(None, "attn9"), "no block attn9"),
    "head out of range": (_cut(None, "attn0.head99"), "out of range"),
    "channel out of range": (_cut(None, "attn0.qk0.99"), "out of range"),
    "not a unit name": (_cut(None, "foo.bar.baz"), "not a unit name"),
    "negative channel": (_cut(None, "attn0.vo0.-1"), "attn0.vo0.-1"),
    "no units": (_cut(None, ","), "no units"),
    "shape of wrong rank": (lambda t: ["inspect", _model(t), "--shape", "x:2,3"], "dims"),
    "shape of unknown input": (lambda t: ["inspect", _model(t), "--shape", "y:2,3,8"],
                               "unknown input"),
    "shape not numbers": (lambda t: ["inspect", _model(t), "--shape", "x:a,b"], "--shape"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    make, message = CASES[case]
    argv = make(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:   # argument errors exit through argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), err
    assert message in lines[0], lines[0]
    assert _snapshot(tmp_path) == before   # nothing written, nothing changed


# --- --method stat on parallel blocks and blocks without a residual add ------------------

def _attention(b: Builder, x: str, p: str) -> str:
    q, k, v = (b.linear(x, f"{p}{n}", WIDTH, WIDTH) for n in ("q", "k", "v"))
    qh = heads_split(b, q, f"{p}qh", [0, 2, 1, 3])
    kh = heads_split(b, k, f"{p}kh", [0, 2, 3, 1])
    vh = heads_split(b, v, f"{p}vh", [0, 2, 1, 3])
    s = b.op("MatMul", [qh, kh], f"{p}scores")
    s = b.op("Mul", [s, b.const(f"{p}scale", np.float32(HEAD_DIM ** -0.5))], f"{p}scaled")
    ctx = b.op("MatMul", [b.op("Softmax", [s], f"{p}probs", axis=-1), vh], f"{p}ctx")
    ctx = b.op("Transpose", [ctx], f"{p}ctx.t", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.ints(f"{p}ctx.shape", [-1, SEQ, WIDTH])], f"{p}flat")
    return b.linear(ctx, f"{p}o", WIDTH, WIDTH)


def _parallel(form: str) -> onnx.ModelProto:
    """GPT-J: attention and FFN read one LayerNorm output and add into one residual, as
    (x + attn) + ffn, (attn + ffn) + x or Sum(x, attn, ffn); "no residual": attention whose
    output feeds the head directly."""
    b = Builder(0)
    if form == "no residual":
        y = _attention(b, "x", "a.")
    else:
        h = b.op("LayerNormalization", ["x", b.const("g", np.ones(WIDTH, np.float32)),
                                        b.const("beta", np.zeros(WIDTH, np.float32))], "h")
        a = _attention(b, h, "a.")
        f = b.linear(b.op("Relu", [b.linear(h, "up", WIDTH, 6)], "act"), "down", 6, WIDTH)
        if form == "x+a+f":
            y = b.op("Add", [b.op("Add", ["x", a], "xa"), f], "y")
        elif form == "a+f+x":
            y = b.op("Add", [b.op("Add", [a, f], "af"), "x"], "y")
        else:
            y = b.op("Sum", ["x", a, f], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)})


@pytest.mark.parametrize("form", ["x+a+f", "a+f+x", "sum", "no residual"])
def test_stat_scores_parallel_blocks_and_blocks_without_residual(form, tmp_path, capsys):
    path = _save(_parallel(form), tmp_path / "m.onnx")
    assert main(["score", path, "--method", "stat", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "attn0   head" in out
    if form != "no residual":
        assert "ffn0    ch" in out
    pruned = tmp_path / "p.onnx"
    assert main([path, str(pruned), "--ratio", "0.2", "--method", "stat", "--quiet"]) == 0
    assert pruned.exists()


# --- a closed stdout ------------------------------------------------------------------------

@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("command", ["inspect", "cut"])
def test_a_closed_stdout_ends_quietly(tmp_path, command, buffered):
    """``onnxprune inspect m.onnx | head -0``: no BrokenPipeError traceback, no "Exception
    ignored" at exit (a block-buffered stdout fails only when flushed); the exit status is
    141 (128 + SIGPIPE), as a shell reports for any tool a closed pipe stops, and, as on any
    failure, nothing is written."""
    path = _model(tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["inspect", path] if command == "inspect" else \
        ["cut", path, str(out), "--remove", "attn0.head1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()   # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert err == ""
    assert not out.exists()


# --- what the checks must not refuse, and a crash found on the way --------------------------

def test_a_minus_inf_mask_is_not_a_bad_weight(tmp_path, capsys):
    """inf is refused in weights (MatMul, Gemm, Conv, norms), not in a -inf attention mask
    added before the Softmax."""
    model = attention_model(mask=True)
    _set_value("mask", (0, 0, 0, 2), -np.inf)(model)
    assert main(["inspect", _save(model, tmp_path / "m.onnx")]) == 0
    assert "attn0" in capsys.readouterr().out


def test_ce_accuracy_on_sequence_outputs_with_soft_targets():
    """--loss ce with float targets on a [N, T, K] output (a forecaster's csv): one class per
    position, not a broadcasting ValueError."""
    from onnxprune.losses import LossSpec, quality

    y = np.random.default_rng(0).standard_normal((4, 6, 3))
    got = quality(LossSpec("ce", ("y",), distill=False), {"y": y}, {"y": y.copy()}, {})
    assert got.name == "accuracy" and got.value == 1.0
