"""``refusalkit orthogonalize``: a copy of the model with the run's direction projected out of its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusalkit.cli.settings import command_config
from refusalkit.core.errors import UserError


def run(args: argparse.Namespace) -> int:
    import shutil

    from refusalkit.core import artifacts
    from refusalkit.direction.orthogonalize import orthogonalize
    from refusalkit.models.session import Session

    cfg, layout = command_config(args, needs={})
    path = layout.direction(args.variant, "direction.safetensors")
    if not path.exists():
        raise UserError(
            f"{args.variant} has no refusal direction in {layout.root}; run refusalkit extract "
            f"--run {args.run} --variant {args.variant} first"
        )
    direction = artifacts.load_tensors(path)["direction"]
    out = Path(args.out)
    replace = out.exists() and any(out.iterdir())
    if replace and not (args.force and (out / "config.json").is_file()):
        raise UserError(
            f"{out} exists and is not empty; choose another --out"
            + (", or give --force to replace the model in it" if (out / "config.json").is_file() else "")
        )
    s = Session(cfg=cfg, layout=layout, variant=args.variant)
    model = orthogonalize(s.lm.model, direction)
    tmp = artifacts.make_temp_dir(out)
    try:
        model.save_pretrained(str(tmp))
        s.lm.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out) if replace else out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"orthogonalized model written to {out}")
    return 0
