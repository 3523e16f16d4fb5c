"""
Bad inputs (issue 12.5): every malformed setting, config file, dataset description or command-line
argument is refused at start-up with one line on stderr saying what to do, exit code 1, no traceback;
none is silently accepted. Categories: non-finite numbers, numbers out of range, values of the wrong
type, inconsistent combinations, binary or garbage files, an absurd meta.json vocabulary, and the
command lines of sample.py and model.py.

Every setting's valid range, as declared where it is defined (config.setting: ModelConfig in model.py,
TrainConfig in train.py) and enforced by config.check_settings; test_range_table_is_current checks this
table against the declarations (bounds inclusive):

| setting | type | default | valid |
|---|---|---|---|
| `vocab_size` | int | `65` | [1, 16777216] |
| `block_size` | int | `64` | [1, 1048576] |
| `n_layer` | int | `4` | [1, 1024] |
| `n_head` | int | `4` | [1, 1024] |
| `n_kv_head` | int | `0` | [0, 1024] |
| `n_embd` | int | `128` | [2, 131072] |
| `ffn_hidden` | int | `0` | [0, 1048576] |
| `dropout` | float | `0.0` | [0, 0.99] |
| `norm_eps` | float | `1e-06` | [1e-12, 0.1] |
| `rope_theta` | float | `10000.0` | [1, 1e+12] |
| `tie_embeddings` | bool | `False` | true, false |
| `init_std` | float | `0.02` | [1e-06, 1] |
| `n_expert` | int | `8` | [0, 4096] |
| `top_k` | int | `2` | [1, 4096] |
| `expert_hidden` | int | `0` | [0, 1048576] |
| `moe_every` | int | `1` | [1, 1024] |
| `capacity_factor` | float | `1.25` | [0, 10000] |
| `gate_norm` | bool | `True` | true, false |
| `gate_lambda` | float | `1.0` | [1e-06, 1000] |
| `aux_loss` | str | `'switch'` | `switch`, `eq4`, `none` |
| `aux_free_bias` | bool | `False` | true, false |
| `out_dir` | str | `'out'` | a directory |
| `dataset` | str | `'shakespeare_char'` | a directory under data_dir |
| `data_dir` | str | `'data'` | a directory |
| `init_from` | str | `'scratch'` | scratch, resume, or a checkpoint path |
| `eval_interval` | int | `250` | [1, 1000000000] |
| `eval_iters` | int | `20` | [1, 1000000] |
| `log_interval` | int | `25` | [1, 1000000000] |
| `save_checkpoint` | bool | `True` | true, false |
| `keep_last` | int | `2` | [0, 10000] |
| `on_nonfinite` | str | `'skip'` | `skip`, `stop` |
| `max_skipped_steps` | int | `5` | [1, 10000] |
| `seed` | int | `1337` | [0, 9223372036854775807] |
| `batch_size` | int | `16` | [1, 10000000] |
| `grad_accum` | int | `1` | [1, 100000] |
| `route_groups` | int | `0` | [0, 10000000] |
| `max_iters` | int | `2000` | [0, 10000000000] |
| `learning_rate` | float | `0.002` | [1e-12, 1] |
| `min_lr` | float | `0.0002` | [0, 1] |
| `lr_schedule` | str | `'cosine'` | `cosine`, `constant` |
| `warmup_iters` | int | `100` | [0, 10000000000] |
| `lr_decay_iters` | int | `0` | [0, 10000000000] |
| `weight_decay` | float | `0.1` | [0, 10] |
| `router_weight_decay` | float or None | `None` | [0, 10] |
| `beta1` | float | `0.9` | [0, 0.999999] |
| `beta2` | float | `0.99` | [0, 0.999999] |
| `grad_clip` | float | `1.0` | [0, 1e+06] |
| `aux_coef_mode` | str | `'adaptive'` | `adaptive`, `fixed` |
| `aux_alpha` | float | `0.01` | [0, 1] |
| `aux_xi` | float | `0.2` | [0, 1000] |
| `aux_alpha_max` | float | `0.01` | [0, 1] |
| `aux_beta` | float | `0.99` | [0, 0.999999] |
| `z_loss_coef` | float | `0.0` | [0, 1] |
| `bias_update_rate` | float | `0.001` | [0, 1] |
| `balance_scope` | str | `'micro'` | `micro`, `global` |
| `device` | str | `'auto'` | auto, cpu, cuda or cuda:N |
| `dtype` | str | `'auto'` | `auto`, `float32`, `bfloat16`, `float64` |
| `compile` | bool | `False` | true, false |
| `ep_size` | int | `1` | [1, 100000] |
| `tp_size` | int | `1` | [1, 100000] |
| `expert_group` | str | `''` | `""`, `tp`, `world`, `etp` |
| `backend` | str | `'auto'` | `auto`, `nccl`, `gloo` |
| `dist_timeout_s` | float | `600.0` | [1, 86400] |

Checked besides, as combinations: top_k <= n_expert; n_embd a multiple of n_head with an even head
dimension; n_kv_head divides n_head; moe_every <= n_layer when n_expert > 0 (else no layer is MoE);
gate_norm needs n_expert >= 2; min_lr <= learning_rate; dtype=float16 is refused (no loss scaling);
ep_size, tp_size, expert_group, batch_size and route_groups against the world size
(tensor_parallel.check_launch); vocab_size against the dataset's meta.json (1..65536, uint16 tokens);
block_size + 2 <= the tokens of each split.

    python -m pytest -q tests/test_bad_inputs.py

Everything runs in this process (main() of train.py, sample.py, model.py, with the interpreter's
handling of sys.exit emulated), except one command line per script that shows the real thing.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing

import pytest

import model
import sample
import train
from config import ConfigError, load_config
from conftest import ONE_THREAD, REPO, one_stderr_line
from model import ModelConfig
from train import TrainConfig

PRESET = os.path.join(REPO, "config", "shakespeare_char.toml")
TINY = [
    "n_layer=2",
    "n_embd=32",
    "n_head=2",
    "block_size=16",
    "batch_size=4",
    "eval_iters=1",
    "max_iters=2",
    "eval_interval=1",
    "warmup_iters=0",
    "save_checkpoint=false",
]

# -----------------------------------------------------------------------------
# the table of ranges

# the string settings without a fixed set of choices: what the table says about them
FREE_TEXT = {
    "out_dir": "a directory",
    "data_dir": "a directory",
    "dataset": "a directory under data_dir",
    "init_from": "scratch, resume, or a checkpoint path",
    "device": "auto, cpu, cuda or cuda:N",
}


def numeric(typ):
    """int or float, also inside Optional; bool is not a number here."""
    args = typing.get_args(typ) or (typ,)
    return any(a in (int, float) for a in args)


def fields():
    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield cls, f, hints[f.name]


def bound(v):
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def range_table():
    """The markdown table of the module docstring, from the dataclass declarations."""
    rows = ["| setting | type | default | valid |", "|---|---|---|---|"]
    for _, f, typ in fields():
        name = " or ".join("None" if a is type(None) else a.__name__ for a in typing.get_args(typ)) or typ.__name__
        lo, hi = f.metadata.get("range", (None, None))
        choices = f.metadata.get("choices")
        if choices is not None:
            valid = ", ".join(f"`{c}`" if c else '`""`' for c in choices)
        elif lo is not None or hi is not None:
            valid = f"[{bound(lo)}, {bound(hi)}]"
        elif typ is bool:
            valid = "true, false"
        else:
            valid = FREE_TEXT[f.name]
        rows.append(f"| `{f.name}` | {name} | `{f.default!r}` | {valid} |")
    return "\n".join(rows)


def test_every_numeric_setting_declares_its_range():
    missing = [f.name for _, f, typ in fields() if numeric(typ) and None in f.metadata.get("range", (None, None))]
    assert not missing, f"numeric settings without a [lowest, highest] range: {missing}"
    untold = [
        f.name for _, f, typ in fields() if typ is str and not f.metadata.get("choices") and f.name not in FREE_TEXT
    ]
    assert not untold, f"string settings the table says nothing about: {untold}"


def test_range_table_is_current():
    table = range_table()
    assert table in __doc__, "the ranges changed: paste this table into the module docstring\n" + table


def outside(lo, hi, typ):
    """A value just below lo and one just above hi, as command-line text."""
    if float in (typing.get_args(typ) or (typ,)):
        below = lo / 2 if lo > 0 else lo - 1e-9 * max(1.0, abs(lo)) - 1e-9
        return [repr(float(below)), repr(float(hi * 2 if hi > 0 else hi + 1))]
    return [str(lo - 1), str(hi + 1)]


@pytest.mark.parametrize(
    "name,value", [(f.name, v) for _, f, typ in fields() if numeric(typ) for v in outside(*f.metadata["range"], typ)]
)
def test_every_bound_is_enforced(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config([f"{name}={value}"], [ModelConfig, TrainConfig])


# -----------------------------------------------------------------------------
# command lines, as the interpreter runs them


def run_main(main, argv, capsys):
    """(exit code, stderr) of main(argv) as `python script.py argv` ends: sys.exit("text") prints the text
    to stderr and exits 1, as the interpreter does. Any other exception escapes: a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return code, err


def one_line_error(main, argv, capsys, *fragments):
    code, err = run_main(main, argv, capsys)
    assert code == 1, (code, err)
    assert err.count("\n") == 1 and err.startswith(("error: ", "config error: ")), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def train_fails(tmp_path, data_dir, capsys, args, *fragments):
    """train.py with the tiny preset and args (a list) fails with one line holding each fragment."""
    argv = [PRESET, *TINY, f"data_dir={data_dir}", f"out_dir={tmp_path}/out", *args]
    return one_line_error(train.main, argv, capsys, *fragments)


# -----------------------------------------------------------------------------
# train.py settings: one case per category, each the way a user could get it wrong

NON_FINITE = [
    ("learning_rate=inf", "learning_rate='inf': must be a finite number"),
    ("learning_rate=nan", "learning_rate='nan': must be a finite number"),
    ("capacity_factor=inf", "capacity_factor='inf': must be a finite number"),
    ("init_std=nan", "init_std='nan': must be a finite number"),
    ("rope_theta=-inf", "rope_theta='-inf': must be a finite number"),
    ("dist_timeout_s=nan", "dist_timeout_s='nan'"),
]
OUT_OF_RANGE = [
    ("init_std=-1", "init_std=-1.0 is out of range"),
    ("init_std=0", "init_std=0.0 is out of range"),
    ("n_embd=0", "n_embd=0 is out of range"),
    ("rope_theta=0", "rope_theta=0.0 is out of range"),
    ("weight_decay=-0.1", "weight_decay=-0.1 is out of range: it must be in [0.0, 10.0]"),
    ("seed=18446744073709551616", "seed=18446744073709551616 is out of range"),  # too large for the RNG
    ("learning_rate=10", "learning_rate=10.0 is out of range"),
    ("capacity_factor=-1", "capacity_factor=-1.0 must be >= 0"),
    ("norm_eps=0", "norm_eps=0.0 is out of range"),
    ("dropout=1", "dropout=1.0 must be in [0, 1)"),
    ("n_layer=-2", "n_layer must be > 0"),
    ("keep_last=-1", "keep_last=-1 is out of range"),
    ("eval_iters=0", "eval_iters=0 is out of range"),
]
WRONG_TYPE = [
    ("n_layer=abc", "n_layer='abc': expected int"),
    ("n_layer=2.5", "n_layer='2.5': expected int"),
    ("learning_rate=fast", "learning_rate='fast': expected float"),
    ("gate_norm=maybe", "gate_norm='maybe': expected true or false"),
    ("aux_loss=l2", "aux_loss='l2': use"),
    ("dtype=float16", "dtype=float16 needs loss scaling"),
    ("device=tpu", "device='tpu': use auto, cpu, cuda or cuda:N"),
]
INCONSISTENT = [
    ("moe_every=3", "moe_every=3 > n_layer=2 leaves no MoE layer"),  # would train a dense model
    ("n_expert=2 top_k=4", "top_k=4 must be in [1, n_expert=2]"),
    ("min_lr=0.01 learning_rate=0.001", "min_lr=0.01 must be <= learning_rate=0.001"),
    ("n_embd=30 n_head=4", "n_embd=30 must be a multiple of n_head=4"),
    ("n_kv_head=3 n_head=4 n_embd=32", "n_kv_head=3 must divide n_head=4"),
    ("n_expert=1 top_k=1", "gate_norm needs n_expert >= 2"),
    ("ep_size=2", "ep_size=2"),  # on one process
]


@pytest.mark.parametrize("args,message", NON_FINITE + OUT_OF_RANGE + WRONG_TYPE + INCONSISTENT)
def test_bad_setting_on_the_command_line(tmp_path, char_data_dir, capsys, args, message):
    train_fails(tmp_path, char_data_dir, capsys, args.split(), message)


def test_settings_caught_after_the_config(tmp_path, char_data_dir, capsys):
    """Settings only the data or the machine can refute: still one line, at start-up."""
    train_fails(tmp_path, char_data_dir, capsys, ["vocab_size=100"], "vocab_size=100 but the dataset has")
    train_fails(tmp_path, char_data_dir, capsys, ["device=cuda"], "no GPU is visible: use device=cpu")
    train_fails(tmp_path, char_data_dir, capsys, ["block_size=100000"], "fewer than block_size+2=100002")


@pytest.mark.parametrize(
    "text,message",
    [
        ("capacity_factor = inf\n", "capacity_factor=inf: must be a finite number"),
        ("aux_alpha = nan\n", "aux_alpha=nan: must be a finite number"),
        ('n_layer = "four"\n', "n_layer='four': expected int"),
        ("learning_rate = true\n", "learning_rate=True: expected float, got bool"),
        ("dropout = [0.1]\n", "dropout=[0.1]: expected float, got list"),
        ("out_dir = 5\n", "out_dir=5: expected str, got int"),
        ("n_layr = 3\n", "unknown config key 'n_layr'"),
        ("[model]\nn_layer = 3\n", "unknown config key 'model'"),
        ("n_layer = = 3\n", "is not valid TOML"),
        ("weight_decay = -1e-3\n", "weight_decay=-0.001 is out of range"),
    ],
)
def test_bad_config_file(tmp_path, char_data_dir, capsys, text, message):
    (tmp_path / "c.toml").write_text(text)
    train_fails(tmp_path, char_data_dir, capsys, [tmp_path / "c.toml"], message)


def test_binary_or_missing_config_file(tmp_path, char_data_dir, capsys):
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 16)
    train_fails(tmp_path, char_data_dir, capsys, [tmp_path / "binary.toml"], "is not valid TOML")
    (tmp_path / "latin1.toml").write_bytes("n_layer = 2 # caf\xe9\n".encode("latin-1"))
    train_fails(tmp_path, char_data_dir, capsys, [tmp_path / "latin1.toml"], "is not valid TOML")
    os.makedirs(tmp_path / "dir.toml")
    train_fails(tmp_path, char_data_dir, capsys, [tmp_path / "dir.toml"], "not found")
    train_fails(tmp_path, char_data_dir, capsys, [tmp_path / "missing.toml"], "not found")
    train_fails(tmp_path, char_data_dir, capsys, ["n_layer"], "expected a config/*.toml file or key=value")


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"vocab_size": 10**12}, "vocab_size=1000000000000 is not a vocabulary of uint16 tokens"),
        ({"vocab_size": -5}, "vocab_size=-5 is not a vocabulary"),
        ({"vocab_size": "65"}, "vocab_size='65' is not a vocabulary"),
        ({"vocab_size": True}, "vocab_size=True is not a vocabulary"),
        ({"vocab_size": 65.5}, "vocab_size=65.5 is not a vocabulary"),
        ({"chars": "abc"}, "is not a dataset description with a vocab_size (KeyError)"),
        ([65], "is not a dataset description with a vocab_size"),
        (b"\x80\x81garbage\xff", "is not a dataset description with a vocab_size"),
    ],
)
def test_absurd_or_garbage_meta_json(tmp_path, char_data_dir, capsys, meta, message):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(char_data_dir, "shakespeare_char"), data / "shakespeare_char")
    path = data / "shakespeare_char" / "meta.json"
    path.write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    train_fails(tmp_path, data, capsys, [], f"{path}", message)


def test_train_command_line_for_real(tmp_path):
    """One real command line: the interpreter's own exit code and stderr, nothing emulated."""
    (tmp_path / "binary.toml").write_bytes(os.urandom(4096))
    p = subprocess.run(
        [sys.executable, "train.py", str(tmp_path / "binary.toml"), "init_std=nan"],
        cwd=REPO,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one_stderr_line(p).startswith(f"config error: config file {tmp_path}/binary.toml is not valid TOML")


# -----------------------------------------------------------------------------
# sample.py and model.py


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "nan"], "need a finite temperature > 0"),
        (["--temperature", "inf"], "need a finite temperature > 0"),
        (["--temperature", "0"], "need a finite temperature > 0"),
        (["--top_k", "0"], "top_k >= 1"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device: use cpu, cuda or cuda:N"),
        (["--device", "meta"], "--device meta: no such device here; use --device cpu"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "checkpoint /nonexistent/ckpt.pt not found"),
        (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
        (["--num_samples"], "argument --num_samples: expected one argument"),
        (["--tempreature", "0.8"], "unrecognized arguments: --tempreature 0.8"),
    ],
)
def test_sample_command_line(capsys, args, message):
    one_line_error(sample.main, args, capsys, message)


def test_sample_unknown_cuda_device(capsys):
    import torch

    if torch.cuda.is_available():
        one_line_error(sample.main, ["--device", f"cuda:{torch.cuda.device_count()}"], capsys, "no such device")
    else:
        one_line_error(sample.main, ["--device", "cuda"], capsys, "no such device here; use --device cpu")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00\x01\x02binary\xff\xfe" * 64, "is not valid TOML"),
        (b"n_embd = 0\n", "n_embd=0 is out of range"),
        (b"capacity_factor = inf\n", "capacity_factor=inf: must be a finite number"),
        (b"n_layer = 2\nmoe_every = 4\n", "moe_every=4 > n_layer=2"),
    ],
)
def test_model_py_config_errors(tmp_path, capsys, content, message):
    (tmp_path / "c.toml").write_bytes(content)
    one_line_error(model.main, [tmp_path / "c.toml"], capsys, message)


def test_model_py_names_the_keys_it_ignores(tmp_path, capsys):
    """model.py takes train.py's config files too, so a key that is no model setting is not an error there:
    it is named, not silently dropped; a near miss of a model setting is a typo, and an error."""
    (tmp_path / "c.toml").write_bytes(b"learning_rate = 1e-3\n")
    model.main([str(tmp_path / "c.toml")])
    assert "(not model settings, ignored here: learning_rate)" in capsys.readouterr().out
    (tmp_path / "typo.toml").write_bytes(b"n_layr = 2\n")
    with pytest.raises(SystemExit, match="unknown config key 'n_layr'; did you mean 'n_layer'"):
        model.main([str(tmp_path / "typo.toml")])


def test_model_py_command_line_for_real(tmp_path):
    (tmp_path / "c.toml").write_bytes(b"\x00\xffnot toml\x80")
    p = subprocess.run(
        [sys.executable, "model.py", str(tmp_path / "c.toml")],
        cwd=REPO,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_stderr_line(p)
    assert line.startswith("config error: config file") and "is not valid TOML" in line
