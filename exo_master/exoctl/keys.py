"""`exoctl keys generate NAME`: make a CURVE keypair for a master or a worker.

    exoctl keys generate master            # on the master's Mac
    exoctl keys generate mac-mini-2        # on each worker's Mac

Writes NAME.key (public: copy it to the other side) and NAME.key_secret (mode 0600: never leaves
the machine) into --dir (default $XDG_CONFIG_HOME/exo/keys or ~/.config/exo/keys), makes the
`authorized/` directory next to them (where a master keeps its workers' NAME.key files), and
prints the paths and the public key's fingerprint (compare it on both machines after copying).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from protocol.keys import KeyFileError, default_keys_dir, fingerprint, generate, load_public

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="CURVE keys for the bus."
)


@app.command("generate")
def generate_command(
    name: Annotated[str, typer.Argument(help="Key name: 'master', or the worker's name.")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write (default ~/.config/exo/keys).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print paths and fingerprint as JSON.")] = False,
) -> None:
    """Write NAME.key (public) and NAME.key_secret (0600); print the paths and the fingerprint."""
    target = directory if directory is not None else default_keys_dir()
    try:
        public, secret = generate(target.expanduser(), name)
        authorized = target.expanduser() / "authorized"
        authorized.mkdir(exist_ok=True)
        print_ = fingerprint(load_public(public))
    except (KeyFileError, OSError) as exc:
        typer.echo(f"exoctl: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        shown = {"public": str(public), "secret": str(secret), "authorized": str(authorized)}
        typer.echo(json.dumps({**shown, "fingerprint": print_}))
        return
    typer.echo(f"public key:  {public}  (copy this one)")
    typer.echo(f"secret key:  {secret}  (mode 0600, keep it here)")
    typer.echo(f"fingerprint: {print_}")
    typer.echo(f"authorized:  {authorized}/  (on the master: the workers' NAME.key files go here)")
