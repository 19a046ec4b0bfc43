"""
The flag parser and its one-line errors, below every script: the data layer (data/prepare.py) and the
scripts (train_backbone.py, train_memory.py, dev/) import it downward; it imports nothing of the project.

    cfg = parse_config(sys.argv[1:], DEFAULTS, column)   # defaults <- preset <- --key=value, type-checked
    check_positive(cfg, ("max_iters", "batch_size"))     # a bad value is a UserError naming the flag

nanoGPT's configurator.py, with one difference: a mistake is one line (UserError), never a stack trace.
"""


class UserError(ValueError):
    """A mistake the user can fix: printed as one line, never a stack trace (train_backbone.run_cli)."""


def parse_config(argv, defaults, column=None):
    """defaults <- preset <- --key=value, each value checked against the default's type.
    column: {preset: overrides}, one script's column of PRESET_TABLE (None: the script has no presets)."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, val = arg[2:].partition("=")
        if key not in defaults:
            raise UserError(f"unknown option --{key}; valid options: {', '.join('--' + k for k in defaults)}")
        overrides[key] = convert(key, val if eq else "true", defaults[key])
    cfg = dict(defaults)
    if column is None:
        return dict(cfg, **overrides)
    preset = overrides.get("preset", cfg["preset"])
    if preset not in column:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(column)}")
    cfg.update(column[preset])
    cfg.update(overrides)
    return cfg


def convert(key, val, default):
    """The text of --key=val as the type of the key's default (bool, int, float or str)."""
    kind = type(default)
    try:
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        if kind is int:
            return int(val)
        if kind is float:
            return float(val)
        return val
    except ValueError:
        hint = " (write it as a whole number, e.g. 5000)" if kind is int else ""
        raise UserError(f"--{key} expects a {kind.__name__}, got {val!r}{hint}") from None


def check_positive(cfg, keys):
    for k in keys:
        if cfg[k] <= 0:
            raise UserError(f"--{k} must be > 0, got {cfg[k]}")


def check_ranges(cfg, rules):
    """rules: key -> (predicate, the valid values in words). The first violation is a one-line UserError."""
    for k, (ok, valid) in rules.items():
        if not ok(cfg[k]):
            raise UserError(f"--{k}={cfg[k]} is out of range: use {valid}")


def check_device(device):
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device={device} is not valid: use auto, cpu, cuda, cuda:N or mps")
