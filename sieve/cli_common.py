"""What every `sieve` command module shares: the consoles, settings + logging setup, and one way to fail."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from sieve.settings import Settings

console = Console()
err = Console(stderr=True)


def cli_settings() -> Settings:
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return settings


def load_backbone_or_exit(settings: Settings):
    """The configured backbone; a missing or unreadable model ends the command with one clear error."""
    from sieve.backbone import BackboneNotFound, WeightsError, load_backbone
    from sieve.registry import resolve_backbone

    try:
        source = resolve_backbone(settings.backbone)
        with err.status(f"loading backbone from {source} ..."):
            return load_backbone(source, home=settings.home / "cache", device=settings.device, dtype=settings.dtype)
    except (BackboneNotFound, WeightsError) as e:
        raise fail(str(e)) from None


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=1)
