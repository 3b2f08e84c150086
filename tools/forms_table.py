"""Build every form users ship (issue 13) and print a markdown table of what onnxprune sees
in it and what the data-free main job does to it, with its time and peak memory.

    python tools/forms_table.py                  # every small form (a few minutes)
    python tools/forms_table.py --only bert      # the forms whose name contains "bert"
    python tools/forms_table.py --large          # also a BERT-base-sized encoder (minutes)
    python tools/forms_table.py --keep /tmp/f    # keep the built models and reports

Each form is built here from a config with random weights and fixed seeds (the builders of
the test suite; nothing from a hub). Counts come from ``onnxprune inspect --json`` and the
main job ``onnxprune IN OUT --ratio 0.5 --report R.json [--shape ...]``, each run in a fresh
subprocess; the main job's wall time and peak RSS (the child's own VmHWM, printed at its
exit) are measured. "RSS ÷ file" is the peak RSS over the model file's size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "fast")]

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.units import unit_kinds  # noqa: E402

RATIO = 0.5
# the child reports its own peak RSS (VmHWM of its address space): the rusage of a forked
# child also counts the parent's pages from before the exec
CLI = ("import atexit, sys; atexit.register(lambda: print('peak-rss-kb', open("
       "'/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)); "
       "from onnxprune.cli import main; sys.exit(main(sys.argv[1:]))")
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Form:
    """A shipped form: how to build it into a folder, and the main job's extra options."""

    name: str
    exporter: str
    dtype: str
    build: Callable[[Path], Path]         # folder -> the written model file
    shapes: Shapes = field(default_factory=dict)
    options: tuple[str, ...] = ()         # extra main-job options, e.g. --samples 8


@dataclass
class ChildRun:
    """One CLI call in a fresh subprocess."""

    exit_code: int
    seconds: float
    peak_rss_kib: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        lines = [ln for ln in (self.stderr + "\n" + self.stdout).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit {self.exit_code}"


@dataclass
class Row:
    form: Form
    build_error: str = ""
    structure: dict[str, Any] | None = None
    inspect_error: str = ""
    report: dict[str, Any] | None = None
    job: ChildRun | None = None
    job_command: str = ""
    file_bytes: int = 0


# -- running the CLI ------------------------------------------------------------------------

def shape_args(shapes: Shapes) -> list[str]:
    return [a for name, dims in shapes.items()
            for a in ("--shape", f"{name}:{','.join(map(str, dims))}")]


def run_cli(args: list[str], folder: Path) -> ChildRun:
    """``onnxprune args`` in a fresh interpreter; wall time and the child's peak RSS."""
    out_path, err_path = folder / "child.out", folder / "child.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=out, stderr=err,
                                 cwd=folder)
        child.wait()
        seconds = time.perf_counter() - start
    errors = err_path.read_text()
    found = re.search(r"^peak-rss-kb (\d+)$", errors, re.M)
    errors = re.sub(r"^peak-rss-kb \d+\n?", "", errors, flags=re.M)
    return ChildRun(child.returncode, seconds, int(found.group(1)) if found else 0,
                    out_path.read_text(), errors)


def command_text(args: list[str]) -> str:
    return shlex.join(["onnxprune", *args])


# -- building ------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Exporters and the optimizer print and warn a lot; the table is the output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def hf_form(name: str, dynamo: bool) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from hf_forms import export_hf

        path = folder / "model.onnx"
        export_hf(name, str(path), dynamo=dynamo, perturbed=True)
        return path
    return build


def bert_raw(folder: Path) -> Path:
    """The tiny BERT of ``test_ort_optimized`` exported with TorchScript, as its fixture."""
    from test_ort_optimized import SEQ, _bert

    model = _bert()
    ids = torch.randint(0, 100, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    return export_ids_mask(model, ids, mask, folder / "raw.onnx")


def export_ids_mask(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    path: Path) -> Path:
    names = ["input_ids", "attention_mask"]
    dynamic = {n: {0: "batch", 1: "seq"} for n in [*names, "y"]}
    torch.onnx.export(model, (ids, mask), str(path), input_names=names, output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes=dynamic)
    return path


def optimized(raw: Callable[[Path], Path], model_type: str, heads: int, hidden: int,
              level: int, fp16: bool = False, mha: bool = False) -> Callable[[Path], Path]:
    """``raw`` through ``onnxruntime.transformers.optimizer`` (and to float16, keeping fp32
    inputs and outputs)."""
    def build(folder: Path) -> Path:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions(model_type)
        options.use_multi_head_attention = mha
        opt = optimizer.optimize_model(str(raw(folder)), model_type=model_type,
                                       num_heads=heads, hidden_size=hidden, opt_level=level,
                                       use_gpu=False, optimization_options=options)
        if fp16:
            opt.convert_float_to_float16(keep_io_types=True)
        path = folder / "model.onnx"
        opt.save_model_to_file(str(path))
        return path
    return build


def clip_raw(kind: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from test_clip_optimized import _encoder, _input, _name

        path = folder / "raw.onnx"
        torch.onnx.export(_encoder(kind), (torch.from_numpy(_input(kind)),), str(path),
                          input_names=[_name(kind)], output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes={_name(kind): {0: "batch"}})
        return path
    return build


def gpt2_raw(folder: Path) -> Path:
    from test_ort_optimized import SEQ, Gpt2

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    return export_ids_mask(Gpt2().eval(), ids, mask, folder / "raw.onnx")


def vit_raw(folder: Path) -> Path:
    from hf_forms import export_hf

    path = folder / "raw.onnx"
    export_hf("vit_eager", str(path), dynamo=False, perturbed=True, opset=17)
    return path


def gqa_export(name: str, dynamo: bool) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from test_gqa_exports import build as build_model
        from test_gqa_exports import export

        path = folder / "model.onnx"
        export(build_model(name), str(path), dynamo)
        return path
    return build


def gpt2_cache(dynamo: bool) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from test_kv_cache_exports import build as build_model
        from test_kv_cache_exports import export

        path = folder / "model.onnx"
        export(build_model(), str(path), dynamo)
        return path
    return build


def llama_cache(dynamo: bool) -> Callable[[Path], Path]:
    """``test_kv_cache_exports.build_llama`` exported as its test does (KV-head past)."""
    def build(folder: Path) -> Path:
        import test_kv_cache_exports as kv

        shape = (1, kv.KV_HEADS, kv.PAST, kv.LLAMA_DIM)
        ids = torch.randint(0, kv.VOCAB, (1, kv.SEQ))
        past = tuple(torch.randn(shape) for _ in kv.NAMES)
        options: dict[str, Any] = {"input_names": ["input_ids", *kv.NAMES],
                                   "output_names": ["logits", *kv.PRESENT],
                                   "dynamo": dynamo, "opset_version": 18}
        if dynamo:
            t, p = torch.export.Dim("t", max=32), torch.export.Dim("p", max=32)
            options["dynamic_shapes"] = ({1: t}, tuple({2: p} for _ in kv.NAMES))
            options["external_data"] = False
        else:
            options["dynamic_axes"] = {"input_ids": {1: "t"}, **{n: {2: "p"} for n in kv.NAMES}}
        path = folder / "model.onnx"
        torch.onnx.export(kv.build_llama(), (ids, *past), str(path), **options)
        return path
    return build


def more_hf(builder: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import test_more_hf_forms as more

        _, _, path = more._export(getattr(more, builder), folder, dynamo=True)
        return Path(path)
    return build


def swin(folder: Path) -> Path:
    """The Swin of ``test_more_hf_forms`` (built inside its test)."""
    import numpy as np
    from forms import export_model
    from hf_forms import OneInOneOut
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16,
                     depths=[2, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = OneInOneOut(SwinForImageClassification(cfg), "pixel_values", "logits").eval()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = folder / "model.onnx"
    export_model(model, x, str(path), dynamo=False, dynamic_batch=False, opset=18)
    return path


def gqa_op(folder: Path) -> Path:
    from test_ops_gqa import gqa_model

    path = folder / "model.onnx"
    onnx.save(gqa_model(past=True, rotary=True), str(path))
    return path


class BertIdsMask(torch.nn.Module):
    """A transformers BertModel taking (input_ids, attention_mask)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BertModel

        self.m = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


LARGE_SEQ = 128


def bert_base_raw(folder: Path) -> Path:
    """BERT-base sizes (12 layers, hidden 768, 12 heads, FFN 3072), random weights."""
    from transformers import BertConfig

    cfg = BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                     intermediate_size=3072, attn_implementation="eager")
    torch.manual_seed(0)
    model = BertIdsMask(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, LARGE_SEQ))
    mask = torch.ones(1, LARGE_SEQ, dtype=torch.int64)
    return export_ids_mask(model, ids, mask, folder / "raw.onnx")


# -- the forms -----------------------------------------------------------------------------

TORCHSCRIPT, DYNAMO = "torch dynamo=False", "torch dynamo=True"
IDS_MASK = {"input_ids": (2, 8), "attention_mask": (2, 8)}
GQA_X = {"x": (1, 8, 64)}


def kv_shapes(heads: int, head_dim: int) -> Shapes:
    names = [f"past_{kv}_{i}" for i in range(2) for kv in ("key", "value")]
    return {"input_ids": (1, 3), **{n: (1, heads, 2, head_dim) for n in names}}


def small_forms() -> list[Form]:
    ort = "ORT optimizer"
    forms = [
        Form("bert (HF eager)", TORCHSCRIPT, "fp32", hf_form("bert_eager", False)),
        Form("bert (HF eager)", DYNAMO, "fp32", hf_form("bert_eager", True)),
        Form("vit (HF eager)", TORCHSCRIPT, "fp32", hf_form("vit_eager", False)),
        Form("ast (HF eager)", TORCHSCRIPT, "fp32", hf_form("ast_eager", False)),
        Form("whisper encoder (HF eager)", TORCHSCRIPT, "fp32",
             hf_form("whisper_enc_eager", False)),
        Form("patchtst (HF eager, layernorm)", DYNAMO, "fp32",
             hf_form("patchtst_ln_eager", True)),
    ]
    for level in (1, 2):
        for fp16 in (False, True):
            forms.append(Form(f"bert o{level}", f"{ort} bert, level {level}",
                              "fp16 (fp32 io)" if fp16 else "fp32",
                              optimized(bert_raw, "bert", 4, 32, level, fp16), IDS_MASK))
    forms.append(Form("bert o2 MultiHeadAttention", f"{ort} bert, level 2, MHA", "fp32",
                      optimized(bert_raw, "bert", 4, 32, 2, mha=True), IDS_MASK))
    for kind, shapes in (("text", {"input_ids": (2, 8)}),
                         ("vision", {"pixel_values": (2, 3, 32, 32)})):
        for fp16 in (False, True):
            forms.append(Form(f"clip {kind} o2", f"{ort} clip, level 2",
                              "fp16 (fp32 io)" if fp16 else "fp32",
                              optimized(clip_raw(kind), "clip", 4, 32, 2, fp16), shapes))
    forms += [
        Form("gpt2 o2", f"{ort} gpt2, level 2", "fp32", optimized(gpt2_raw, "gpt2", 4, 32, 2),
             IDS_MASK),
        Form("vit o2", f"{ort} vit, level 2", "fp32", optimized(vit_raw, "vit", 4, 32, 2),
             {"x": (2, 3, 16, 16)}),
    ]
    for dynamo, exporter in ((False, TORCHSCRIPT), (True, DYNAMO)):
        forms += [
            Form("llama GQA", exporter, "fp32", gqa_export("llama", dynamo), GQA_X),
            Form("qwen2 GQA", exporter, "fp32", gqa_export("qwen2", dynamo), GQA_X),
        ]
    for dynamo, exporter in ((False, TORCHSCRIPT), (True, DYNAMO)):
        forms += [
            Form("gpt2 KV cache", exporter, "fp32", gpt2_cache(dynamo), kv_shapes(4, 8)),
            Form("llama GQA KV cache", exporter, "fp32", llama_cache(dynamo),
                 kv_shapes(2, 16)),
        ]
    forms += [
        Form("phi3 fused gate_up", DYNAMO, "fp32", more_hf("_phi3")),
        Form("gpt2 Conv1D", DYNAMO, "fp32", more_hf("_gpt2")),
        Form("swin", TORCHSCRIPT, "fp32", swin),
        Form("com.microsoft GroupQueryAttention (past, rotary)", "hand-built", "fp32", gqa_op,
             {"past_k": (2, 2, 4, 16), "past_v": (2, 2, 4, 16)}),
    ]
    return forms


def large_form() -> Form:
    shapes = {"input_ids": (1, LARGE_SEQ), "attention_mask": (1, LARGE_SEQ)}
    return Form("bert-base size (12×768, 12 heads, FFN 3072)",
                "torch dynamo=False + ORT optimizer bert, level 2", "fp32",
                optimized(bert_base_raw, "bert", 12, 768, 2), shapes, ("--samples", "8"))


# -- measuring -----------------------------------------------------------------------------

def measure(form: Form, folder: Path) -> Row:
    row = Row(form)
    torch.manual_seed(0)
    try:
        with quiet():
            path = form.build(folder)
    except Exception as exc:  # the table reports the failure instead of stopping
        row.build_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}" \
            if str(exc).strip() else type(exc).__name__
        return row
    row.file_bytes = path.stat().st_size
    shapes = shape_args(form.shapes)
    inspect = run_cli(["inspect", "--json", str(path), *shapes], folder)
    if inspect.exit_code == 0:
        row.structure = json.loads(inspect.stdout)
    else:
        row.inspect_error = inspect.error_line()
    report = folder / "report.json"
    args = [str(path), str(folder / "pruned.onnx"), "--ratio", str(RATIO), *shapes,
            *form.options, "--report", str(report)]
    row.job, row.job_command = run_cli(args, folder), command_text(args)
    if row.job.exit_code == 0 and report.exists():
        row.report = json.loads(report.read_text())
    return row


# -- the table -----------------------------------------------------------------------------

def kind_of(name: str) -> str:
    """The unit kind key of a printed unit name ("attn0.head1" -> "head"); the report may
    prefix a step number ("1:attn0.head1")."""
    prefix, _, tail = name.split(":")[-1].partition(".")
    if not tail:
        return re.sub(r"\d+$", "", prefix)
    return next((k.key for k in unit_kinds() if k.pattern and re.fullmatch(k.pattern, tail)),
                "?")


def removed_by_kind(report: dict[str, Any]) -> str:
    counts = Counter(kind_of(name) for name in report["removed"])
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none"


def distinct(values: list[Any]) -> str:
    return "/".join(str(v) for v in dict.fromkeys(values)) or "-"


def head_text(block: dict[str, Any]) -> str:
    kv = block.get("kv_heads")
    return f"{block['heads']} ({kv} KV)" if kv and kv != block["heads"] else str(block["heads"])


def structure_cells(structure: dict[str, Any]) -> list[str]:
    attention = [b for b in structure["blocks"] if b["kind"] == "attention"]
    ffn = [b for b in structure["blocks"] if b["kind"] == "ffn"]
    return [str(len(attention)), distinct([head_text(b) for b in attention]),
            f"{len(ffn)} × {distinct([b['channels'] for b in ffn])}" if ffn else "0"]


def human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def cells(row: Row) -> list[str]:
    form = row.form
    head = [form.name, form.exporter, form.dtype]
    if row.build_error:
        return [*head, f"build failed: {row.build_error}", *["-"] * 8]
    counts = structure_cells(row.structure) if row.structure else \
        [f"inspect failed: {row.inspect_error}", "-", "-"]
    job = row.job
    assert job is not None
    if row.report:
        params = row.report["params"]
        removed = removed_by_kind(row.report)
        change = f"{human(params['before'])}→{human(params['after'])}"
    else:
        removed, change = "-", "-"
    rss_mib = job.peak_rss_kib / 1024
    ratio = job.peak_rss_kib * 1024 / row.file_bytes
    return [*head, *counts, removed, change, str(job.exit_code), f"{job.seconds:.1f}",
            f"{rss_mib:.0f}", f"{ratio:.0f}"]


COLUMNS = ["form", "exporter / optimizer", "dtype", "attention blocks", "heads",
           "FFN blocks × width", "removed by the main job", "params before→after", "exit",
           "main job s", "peak RSS MiB", "RSS ÷ file"]


def markdown_line(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


def failures(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        if row.job is not None and row.job.exit_code != 0:
            lines.append(f"- {row.form.name} ({row.form.exporter}, {row.form.dtype}): "
                         f"`{row.job_command}` exited {row.job.exit_code}: "
                         f"{row.job.error_line()}")
        if row.inspect_error:
            lines.append(f"- {row.form.name} ({row.form.exporter}): inspect failed: "
                         f"{row.inspect_error}")
    return lines


def header(argv: list[str]) -> list[str]:
    return [f"command: {shlex.join(['python', 'tools/forms_table.py', *argv])}",
            f"onnxprune {onnxprune.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"torch {torch.__version__}, python {sys.version.split()[0]}; "
            f"main job: --ratio {RATIO}, default method, data-free; timings measured under "
            "load", ""]


def selected(args: argparse.Namespace) -> list[Form]:
    forms = small_forms() + ([large_form()] if args.large else [])
    if args.only:
        forms = [f for f in forms if args.only.lower() in f"{f.name} {f.exporter}".lower()]
    return forms


def slug(index: int, form: Form) -> str:
    return f"{index:02d}_" + re.sub(r"[^a-z0-9]+", "_", f"{form.name} {form.exporter} "
                                                         f"{form.dtype}".lower()).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", metavar="SUBSTRING", help="only forms whose name or exporter "
                    "contains this (case-insensitive)")
    ap.add_argument("--large", action="store_true", help="also the BERT-base-sized form")
    ap.add_argument("--keep", metavar="DIR", help="build into DIR and keep the files")
    args = ap.parse_args()
    forms = selected(args)
    print("\n".join(header(sys.argv[1:])), flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="forms_table_")))
        rows = []
        for index, form in enumerate(forms):
            folder = root / slug(index, form)
            folder.mkdir(parents=True, exist_ok=True)
            rows.append(measure(form, folder))
            print(f"built and pruned {form.name} ({form.exporter}, {form.dtype})",
                  file=sys.stderr, flush=True)
    print(markdown_line(COLUMNS))
    print(markdown_line(["---"] * len(COLUMNS)))
    for row in rows:
        print(markdown_line(cells(row)))
    failed = failures(rows)
    if failed:
        print("\nfailures:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
