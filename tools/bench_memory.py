"""Issue 16: peak resident memory ÷ model file size, and wall time, of ``inspect``, ``cut``
and the main job, each in a fresh subprocess. Prints a markdown table.

    python tools/bench_memory.py                         # the reference models
    python tools/bench_memory.py --models bert-base t5-base
    python tools/bench_memory.py --models llama-1b --limit-gb 20   # ~1.1B decoder, fp16

Models: the three reference models (with their calibration data: 256 windows or clips) and,
built here from configs with random weights and fixed seeds (nothing from a hub): a
BERT-base-sized encoder (12 × 768, 12 heads, FFN 3072, seq 128, TorchScript export, fp32), a
T5-base-sized encoder (Chronos-like: 12 × 768, 12 heads, FFN 3072, seq 128) and a
Llama-style decoder of about 1.1B parameters (22 × 2048, 32 heads, 4 KV groups, FFN 5632,
exported with its KV cache, fp16 weights, external data). Models built from configs are
pruned data-free (``--samples 32``). Peak RSS is the child's own VmHWM; a watchdog kills a
child whose RSS passes ``--limit-gb`` and the row says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools")]

from forms_table import CLI, quiet  # noqa: E402

SEQ = 128


@dataclass(frozen=True)
class Subject:
    name: str
    build: Callable[[Path], Path]
    options: tuple[str, ...] = ()            # the main job's data options
    shapes: tuple[str, ...] = ()             # --shape arguments for every command
    cut: str = "attn0.head1,ffn0.ch7"


@dataclass
class Run:
    command: str
    exit_code: int = 0
    seconds: float = 0.0
    peak_kib: int = 0
    killed_at_gb: float | None = None
    error: str = ""


@dataclass
class Row:
    subject: Subject
    file_bytes: int = 0
    runs: list[Run] = field(default_factory=list)


# -- running -------------------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+)", text)
    return int(found.group(1)) if found else 0


def run_cli(command: str, args: list[str], folder: Path, limit_gb: float) -> Run:
    """``onnxprune args`` in a fresh interpreter: wall time, its peak RSS, killed if over."""
    run = Run(command)
    err_path = folder / "child.err"
    with err_path.open("w") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.DEVNULL,
                                 stderr=err, cwd=folder)
        killed = threading.Event()

        def watch() -> None:
            while child.poll() is None:
                if _rss_kib(child.pid) > limit_gb * 2**20:
                    killed.set()
                    child.kill()
                    return
                time.sleep(0.2)
        threading.Thread(target=watch, daemon=True).start()
        child.wait()
        run.seconds = time.perf_counter() - start
    errors = err_path.read_text()
    found = re.search(r"^peak-rss-kb (\d+)$", errors, re.M)
    run.peak_kib = int(found.group(1)) if found else 0
    run.exit_code = child.returncode
    if killed.is_set():
        run.killed_at_gb = limit_gb
    elif child.returncode:
        lines = [ln for ln in errors.splitlines() if ln.strip() and "peak-rss" not in ln]
        run.error = lines[-1][:120] if lines else f"exit {child.returncode}"
    return run


def measure(subject: Subject, folder: Path, limit_gb: float) -> Row:
    with quiet():
        path = subject.build(folder)
    row = Row(subject, file_bytes=_file_bytes(path))
    shapes = list(subject.shapes)
    row.runs.append(run_cli("inspect", ["inspect", str(path), *shapes], folder, limit_gb))
    row.runs.append(run_cli("cut", ["cut", str(path), str(folder / "cut.onnx"), "--remove",
                                    subject.cut, *shapes], folder, limit_gb))
    row.runs.append(run_cli("main job", [str(path), str(folder / "pruned.onnx"), "--ratio",
                                         "0.3", *subject.options, *shapes, "--quiet"],
                            folder, limit_gb))
    return row


def _file_bytes(path: Path) -> int:
    import onnx

    from onnxprune.bench import file_bytes

    return file_bytes(path, onnx.load(str(path), load_external_data=False))


# -- the subjects -----------------------------------------------------------------------------

def _reference(name: str, calib: str) -> Subject:
    def build(folder: Path) -> Path:
        return REPO / "models" / f"{name}.onnx"
    return Subject(name, build, ("--calib", calib, "--samples", "256"))


def _export(model, args: tuple, names: list[str], outputs: list[str], path: Path,
            dynamic: dict, external: bool = False) -> Path:
    import torch

    torch.onnx.export(model, args, str(path), input_names=names, output_names=outputs,
                      opset_version=17, dynamo=False, dynamic_axes=dynamic)
    if external:
        import onnx

        model_proto = onnx.load(str(path))
        # onnx appends to an existing side file: a model built again in a --keep folder
        # would otherwise carry the first build's weights as dead bytes
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        onnx.save_model(model_proto, str(path), save_as_external_data=True,
                        location=f"{path.name}.data")
    return path


def bert_base(folder: Path) -> Path:
    from forms_table import bert_base_raw

    return bert_base_raw(folder)


def t5_base(folder: Path) -> Path:
    import torch
    from transformers import T5Config, T5EncoderModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = T5Config(d_model=768, num_layers=12, num_heads=12, d_ff=3072, d_kv=64,
                           vocab_size=4096, attn_implementation="eager")
            self.m = T5EncoderModel(cfg)

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    return _export(Encoder().eval(), (ids, mask), names, ["y"], folder / "t5.onnx",
                   {n: {0: "batch", 1: "seq"} for n in [*names, "y"]})


def llama_1b(folder: Path) -> Path:
    """~1.1B parameters (TinyLlama's shape), KV cache, fp16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                      attn_implementation="eager", use_cache=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(torch.float16)
    layers, kv_heads, head_dim, past = 22, 4, 64, 8
    names = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, *flat):
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
            for i in range(layers):
                cache.update(flat[2 * i], flat[2 * i + 1], i)
            out = self.m(input_ids=input_ids, past_key_values=cache, use_cache=True)
            kv = out.past_key_values
            return (out.logits, *[t for i in range(layers)
                                  for t in (kv.layers[i].keys, kv.layers[i].values)])

    ids = torch.randint(0, 32000, (1, 4))
    flat = tuple(torch.randn(1, kv_heads, past, head_dim, dtype=torch.float16) for _ in names)
    present = [n.replace("past", "present") for n in names]
    dynamic = {"input_ids": {1: "t"}, **{n: {2: "p"} for n in names}}
    return _export(Step().eval(), (ids, *flat), ["input_ids", *names], ["logits", *present],
                   folder / "llama.onnx", dynamic, external=True)


def _shape_args(shapes: dict[str, str]) -> tuple[str, ...]:
    return tuple(a for n, d in shapes.items() for a in ("--shape", f"{n}:{d}"))


IDS_MASK = _shape_args({"input_ids": f"1,{SEQ}", "attention_mask": f"1,{SEQ}"})
DATA_FREE = ("--samples", "32")


def subjects(data: Path) -> dict[str, Subject]:
    csv = str(REPO.parent / "shared" / "data" / "ETTh1.csv")
    llama_shapes = {"input_ids": "1,4", **{f"past_{kv}_{i}": "1,4,8,64" for i in range(22)
                                            for kv in ("key", "value")}}
    return {
        "patchtst": _reference("patchtst_etth1", csv),
        "tsfm": _reference("tsfm_small", csv),
        "ast": _reference("ast_fsdd", str(data / "fsdd_train.npz")),
        "bert-base": Subject("bert-base (12×768, seq 128, fp32)", bert_base, DATA_FREE,
                             IDS_MASK),
        "t5-base": Subject("t5-base encoder (12×768, seq 128, fp32)", t5_base, DATA_FREE,
                           IDS_MASK),
        "llama-1b": Subject("llama ~1.1B decoder (22×2048, KV cache, fp16)", llama_1b,
                            DATA_FREE, _shape_args(llama_shapes),
                            cut="attn0.kv1,ffn0.ch7"),   # grouped-query: a whole KV group
    }


# -- the table --------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    lines = ["| model | file MiB | command | peak RSS MiB | RSS ÷ file | wall s | exit |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        mib = row.file_bytes / 2**20
        for run in row.runs:
            peak = run.peak_kib / 1024
            outcome = (f"killed over {run.killed_at_gb:g} GB" if run.killed_at_gb
                       else run.error or str(run.exit_code))
            lines.append(f"| {row.subject.name} | {mib:,.1f} | {run.command} | "
                         f"{peak:,.0f} | {peak / mib:.1f}× | {run.seconds:.1f} | {outcome} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["patchtst", "tsfm", "ast"],
                        choices=["patchtst", "tsfm", "ast", "bert-base", "t5-base",
                                 "llama-1b"])
    parser.add_argument("--data", type=Path, default=REPO / "data",
                        help="folder with the npz files of tools/make_data.py")
    parser.add_argument("--limit-gb", type=float, default=18.0,
                        help="kill a child whose resident memory passes this (default 18)")
    parser.add_argument("--keep", type=Path, help="build the models in this folder")
    args = parser.parse_args()
    found = subjects(args.data)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep / name if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            rows.append(measure(found[name], folder, args.limit_gb))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} cores; onnxprune in a fresh interpreter per command")
    print(table(rows))


if __name__ == "__main__":
    main()
