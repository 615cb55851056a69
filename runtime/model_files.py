"""Find the Paddle program in an unpacked model folder and tell which format it is (no Paddle import).

Accepted layouts, at the top of the folder or inside a single sub-folder:
- legacy: ``<stem>.pdmodel`` + ``<stem>.pdiparams`` (what Paddle 2.x writes, and Paddle 3 with
  ``FLAGS_enable_pir_api=0``; the only format Paddle Lite's optimiser reads);
- PIR: ``<stem>.json`` + ``<stem>.pdiparams`` (Paddle 3's default ``paddle.jit.save``).
Optional golden examples: ``example_inputs.npz`` (and ``example_outputs.npz``), keyed by tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXAMPLE_INPUTS = "example_inputs.npz"
EXAMPLE_OUTPUTS = "example_outputs.npz"


class ModelFormatError(ValueError):
    """The folder does not hold exactly one Paddle inference program; the message says what to upload."""


@dataclass(frozen=True)
class ModelFiles:
    format: str  # "legacy" or "pir"
    program: Path
    params: Path
    example_inputs: Path | None
    example_outputs: Path | None


def find_model(folder: Path) -> ModelFiles:
    root = _model_root(folder)
    candidates = sorted(root.glob("*.pdmodel")) + sorted(
        p for p in root.glob("*.json") if p.with_suffix(".pdiparams").exists()
    )
    if not candidates:
        raise ModelFormatError(
            "no Paddle inference model found: upload model.pdmodel + model.pdiparams (legacy format) or "
            "model.json + model.pdiparams (Paddle 3 PIR), as written by paddle.jit.save"
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ModelFormatError(f"more than one model program in the archive ({names}); upload exactly one")
    program = candidates[0]
    params = program.with_suffix(".pdiparams")
    if not params.exists():
        raise ModelFormatError(f"{program.name} has no weights beside it: add {params.name} to the archive")
    inputs = root / EXAMPLE_INPUTS
    outputs = root / EXAMPLE_OUTPUTS
    if outputs.exists() and not inputs.exists():
        raise ModelFormatError(f"{EXAMPLE_OUTPUTS} needs {EXAMPLE_INPUTS} beside it (the inputs it answers)")
    return ModelFiles(
        format="legacy" if program.suffix == ".pdmodel" else "pir",
        program=program,
        params=params,
        example_inputs=inputs if inputs.exists() else None,
        example_outputs=outputs if outputs.exists() else None,
    )


def _model_root(folder: Path) -> Path:
    """The folder itself, or its only sub-folder when an archive wraps everything in one directory."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder
