"""--config FILE.toml: every long option of a command from a file, the command line wins,
unknown keys are one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxprune.cli import COMMANDS, build_parser, main
from onnxprune.config import apply_config
from onnxprune.errors import OnnxpruneError

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "patchtst_etth1.onnx")


def toml(tmp_path, text: str) -> str:
    path = tmp_path / "prune.toml"
    path.write_text(text)
    return str(path)


def parsed(argv: list[str]):
    parser = build_parser()
    return parser.parse_args(apply_config(parser, argv, COMMANDS))


def test_file_options_apply_and_the_command_line_wins(tmp_path):
    path = toml(tmp_path, 'ratio = 0.3\nsamples = 8\nmax_drop = 0.05\nround-to = 4\n'
                          'quiet = true\nkeep = ["attn0", "ffn5"]\nshape = ["x:2,336,7"]\n'
                          'prune_steps = 3\n')
    args = parsed(["prune", "in.onnx", "out.onnx", "--config", path, "--ratio", "0.5",
                   "--keep", "ffn1", "--steps", "2"])
    assert args.ratio == 0.5                   # the command line wins ...
    assert args.keep == ["ffn1"]               # ... also for repeatable options
    assert args.steps == 2                     # ... also through an alias (--steps)
    assert (args.samples, args.max_drop, args.round_to, args.quiet) == (8, 0.05, 4, True)
    assert args.shape == [("x", (2, 336, 7))]  # typed as on the command line
    args = parsed(["prune", "in.onnx", "out.onnx", "--config", path])
    assert args.keep == ["attn0", "ffn5"] and args.ratio == 0.3 and args.steps == 3


def test_a_command_table_wins_over_the_top_level_and_other_tables_are_skipped(tmp_path):
    path = toml(tmp_path, 'seed = 1\n[prune]\nratio = 0.3\nseed = 7\n[finetune]\nsteps = 3\n'
                          'lr = 1e-3\n')
    args = parsed(["prune", "in.onnx", "out.onnx", "--config", path])
    assert (args.seed, args.ratio, args.steps) == (7, 0.3, 1)
    args = parsed(["finetune", "in.onnx", "out.onnx", "--train", "t.npz", "--config", path,
                   "--epochs", "2"])           # --epochs excludes the file's steps
    assert (args.epochs, args.steps, args.lr, args.seed) == (2, None, 1e-3, 1)
    with pytest.raises(OnnxpruneError, match="unknown option 'ratio' for onnxprune finetune"):
        parsed(["finetune", "in.onnx", "out.onnx", "--train", "t.npz", "--config",
                toml(tmp_path, "ratio = 0.3\n")])


def test_json_flags_and_lists(tmp_path):
    args = parsed(["inspect", "m.onnx", "--config", toml(tmp_path, "json = true\n")])
    assert args.json == "-"
    args = parsed(["inspect", "m.onnx", "--config", toml(tmp_path, 'json = "out.json"\n')])
    assert args.json == "out.json"
    args = parsed(["bench", "m.onnx", "--config", toml(tmp_path, "batch = [1, 8]\n"
                                                                 "no-memory = false\n")])
    assert args.batch == [1, 8] and args.no_memory is False


@pytest.mark.parametrize("text, message", [
    ("ratioo = 0.5\n", "unknown option 'ratioo' for onnxprune prune"),
    ("help = true\n", "unknown option 'help'"),
    ("config = 'other.toml'\n", "unknown option 'config'"),
    ("quiet = 1\n", "quiet: a flag; give true or false"),
    ("ratio = true\n", "ratio: expected a value"),
    ("[finetune]\nbogus = 2\n", "unknown option 'bogus' for onnxprune finetune"),
    ("ratio = \n", "not valid TOML"),
])
def test_bad_files_are_one_line_errors_with_exit_2(tmp_path, capsys, text, message):
    out = tmp_path / "out.onnx"
    assert main([MODEL, str(out), "--config", toml(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert main([MODEL, str(tmp_path / "o.onnx"), "--config", str(tmp_path / "no.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_whole_run_from_a_file(tmp_path, capsys):
    report = tmp_path / "report.json"
    path = toml(tmp_path, f'ratio = 0.3\nsamples = 8\nmethod = "magnitude"\n'
                          f'reconstruct = "none"\nquiet = true\nkeep = ["ffn0"]\n'
                          f'report = "{report}"\n')
    out = tmp_path / "out.onnx"
    assert main(["--config", path, MODEL, str(out), "--ratio", "0.2"]) == 0
    data = json.loads(report.read_text())
    assert data["ratio"] == 0.2 and data["method"] == "magnitude" and data["keep"] == ["ffn0"]
    assert out.exists() and not any(u.startswith("ffn0") for u in data["removed"])
