"""`semantic config ...` and `semantic doctor`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .. import config, paths
from ..errors import NotFoundError, SemanticError
from . import render

app = typer.Typer(help="Show and change settings (a TOML file in the config dir).", no_args_is_help=True)


@app.command("show")
def show(json_out: bool = typer.Option(False, "--json", metavar="", help="Print JSON.")) -> None:
    """Every setting, its effective value and where it comes from."""
    values = config.effective()
    if json_out:
        print(json.dumps({k: {"value": v, "source": src} for k, (v, src) in values.items()}, indent=2))
        return
    out = render.stdout()
    for key, (value, src) in values.items():
        out.print(f"{key} = {value!r}  [dim]({src})[/dim]")


@app.command("get")
def get(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Print one setting's effective value."""
    print(config.get(key))


@app.command("set")
def set_(key: str = typer.Argument(..., help="Setting name."), value: str = typer.Argument(..., help="New value.")) -> None:
    """Write a setting to the config file."""
    stored = config.set_value(key, value)
    print(f"{key} = {stored!r}", file=sys.stderr)


@app.command("path")
def path() -> None:
    """Print the config file's path."""
    print(paths.config_file())


def doctor(json_out: bool = typer.Option(False, "--json", metavar="", help="Print JSON.")) -> None:
    """Backend, device, BLAS, dtype, model and directories.

    A model that cannot be used (not found, or not a model) is reported, and after the whole report the command fails with its
    error and exit code (3: not found).
    """
    from rich.text import Text

    from ..backend import buffers, runtime

    info = runtime.info()
    restore = buffers.restore_code()
    spec, model_path, ready, note, problem = _model_status()
    report = {
        "version": __import__("semantic_cli").__version__,
        "python": sys.version.split()[0],
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "backend": info.backend,
        "device": info.device,
        "blas": info.blas,
        "dtype": info.compute_dtype if info.compute_dtype != "model" else "the model's own",
        "restore_code": restore + ("" if restore == "native" else " (`make native` says what the native loops need)"),
        "model": spec,
        "model_path": model_path,
        "model_ready": ready,
        "data_dir": str(paths.data_dir(create=False)),
        "cache_dir": str(paths.cache_dir(create=False)),
        "config_file": str(paths.config_file()),
        "server": _server(),
    }
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        out = render.stdout()
        width = max(map(len, report))
        shown = {**report, "model_ready": ("yes" if ready else "no") + (f" ({note})" if note else "")}
        for key, value in shown.items():
            out.print(Text(f"{key:{width}}", style="bold") + Text(f" {value}"))
    if problem is not None:
        raise problem


def _model_status() -> tuple[str, str, bool, str, SemanticError | None]:
    """The model a new agent would use: its spec, where it is, whether it is ready, a note
    on what its first use does, and the error that makes it unusable (None when usable).
    Cheap: nothing is converted or downloaded."""
    from ..model.default import default_model_dir, default_model_ready
    from ..model.loader import DEFAULT, local_model_dir, requested_spec, resolve

    spec = requested_spec(None)
    if spec == DEFAULT:
        ready = default_model_ready()
        return spec, str(default_model_dir()), ready, "" if ready else "prepared on first use, or by `make model`", None
    path = Path(spec).expanduser()
    gguf = path.is_file() and path.suffix == ".gguf"
    try:
        if not gguf:
            resolve(spec)  # cheap for anything but a GGUF: checks a directory, or the form of a repo id
    except SemanticError as exc:
        return spec, spec, False, "not found" if isinstance(exc, NotFoundError) else "not a usable model", exc
    local = local_model_dir(spec)
    if local is not None:
        return spec, str(local), True, "", None
    first_use = "converted on first use" if gguf else "downloaded from the Hugging Face hub on first use; needs a network"
    return spec, spec, False, first_use, None


def _server() -> str:
    from ..server import runtime

    info = runtime.find()
    if info is None:
        return "not running (`semantic serve` starts one; chat then uses it)"
    where = ", ".join(x for x in (f"unix:{info.socket}" if info.socket else "", f"{info.url}/v1" if info.url else "") if x)
    return f"running (pid {info.pid}, model {info.model}) at {where}"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
