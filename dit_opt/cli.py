"""The ``dit-opt`` command line."""

from __future__ import annotations

import warnings
from typing import Any

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(
    name="dit-opt",
    help="Make Diffusion Transformers cheaper to sample from under an explicit FLOP budget.",
    no_args_is_help=True,
    add_completion=False,
)
_console = Console()


@app.callback()
def _root() -> None:
    """Make Diffusion Transformers cheaper to sample from under an explicit FLOP budget."""


def _load_model(name: str) -> tuple[Any, dict[str, Any]]:
    """A built-in model by name: a tiny test config or a shipped reference model."""
    from dit_opt.testing import tiny_model, tiny_names

    if name in tiny_names():
        return tiny_model(name)
    try:
        from dit_opt import zoo
    except ImportError:  # the zoo ships with the package; this only guards partial installs
        zoo = None
    if zoo is not None and name in zoo.available():
        sampler = zoo.load(name)
        return sampler.transformer, sampler.example_inputs()
    known = tiny_names() + (zoo.available() if zoo is not None else [])
    raise typer.BadParameter(f"unknown model {name!r}; choose one of {', '.join(known)}", param_hint="MODEL")


@app.command()
def capture(
    model: str = typer.Argument("dit", help="A built-in model: a tiny config (dit, pixart, sd3, flux, sana, "
                                "wan) or a shipped reference model (digits-dit, digits-mmdit)."),
) -> None:
    """Capture a built-in model as an FX graph and print its block table and FLOPs."""
    from dit_opt.capture import capture as do_capture
    from passes.annotate_flops import annotate_flops

    module, inputs = _load_model(model)
    with _console.status(f"capturing {type(module).__name__} with torch.export ..."), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = do_capture(module, inputs)
        annotate_flops(graph)
    typer.echo(graph.summary())
    typer.echo(f"captured in {graph.capture_seconds:.1f} s; FLOPs per forward: {graph.flops:,}")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
