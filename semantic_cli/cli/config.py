"""`semantic config ...` and `semantic doctor`."""

from __future__ import annotations

import json
import sys

import typer

from .. import config, paths
from . import render

app = typer.Typer(help="Show and change settings (a TOML file in the config dir).", no_args_is_help=True)


@app.command("show")
def show(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
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


def doctor(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Backend, device, BLAS, dtype, model and directories."""
    from ..backend import buffers, runtime
    from ..model.default import default_model_dir, default_model_ready
    from ..model.loader import DEFAULT, requested_spec

    info = runtime.info()
    restore = buffers.restore_code()
    spec = requested_spec(None)
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
        "model_path": str(default_model_dir()) if spec == DEFAULT else spec,
        "model_ready": default_model_ready() if spec == DEFAULT else None,
        "data_dir": str(paths.data_dir(create=False)),
        "cache_dir": str(paths.cache_dir(create=False)),
        "config_file": str(paths.config_file()),
        "server": _server(),
    }
    if json_out:
        print(json.dumps(report, indent=2))
        return
    out = render.stdout()
    width = max(map(len, report))
    for key, value in report.items():
        out.print(f"[bold]{key:{width}}[/bold] {value}")


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
