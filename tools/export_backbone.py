"""Export the backbone of a DeSD checkpoint as a bare `.safetensors` state dict.

    python export_backbone.py checkpoint.pth    # -> teacher_backbone.safetensors beside it
    python export_backbone.py DeSD_Res50.pth --out desd_res50_teacher.safetensors
    python export_backbone.py checkpoint.pth --which student

Works on main_desd.py's `checkpoint.pth`, on the released DeSD checkpoint (read with
`weights_only=True`; only its `argparse.Namespace` is allowed) and on bare state dicts.
The keys are those of `models.ResNet3D` (`conv1.weight`, `layer1.0.conv1.weight`, ...),
so `finetune_example.load_pretrained_encoder` and `encoder.load_state_dict` take the
file directly; a `.safetensors` file holds only tensors and cannot run code when read.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from finetune_example import PretrainedLoadError, backbone_only, extract_backbone_state, infer_arch


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                    which: str | None = None) -> dict:
    """Write the backbone of `checkpoint` to `out` (atomically); return a summary.

    `which`: 'teacher' or 'student'; by default the teacher, else the student, else the
    checkpoint itself as a bare state dict. `out` defaults to `teacher_backbone.safetensors`
    (`student_…`, or `<checkpoint name>_backbone…` for a bare state dict) beside the
    checkpoint.
    """
    from safetensors.torch import save_file
    checkpoint = Path(checkpoint)
    state, source = extract_backbone_state(checkpoint, which)
    backbone = backbone_only(state)
    if not backbone:
        raise PretrainedLoadError(f"{checkpoint}: its {source} has no backbone tensors "
                                  f"(conv1, norm1, layer1..4); its entries look like "
                                  f"{', '.join(list(state)[:3])}")
    arch = infer_arch(backbone)
    if out is None:
        stem = source if source in ("teacher", "student") else checkpoint.name.split(".")[0]
        out = checkpoint.with_name(f"{stem}_backbone.safetensors")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory or are not contiguous.
    tensors = {k: v.detach().contiguous().clone() for k, v in backbone.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"arch": arch or "unknown", "source": source,
                                           "checkpoint": checkpoint.name})
    os.replace(tmp, out)
    return {"out": str(out), "arch": arch, "source": source, "n_tensors": len(tensors),
            "n_dropped": len(state) - len(tensors)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint.pth of main_desd.py, the released DeSD "
                                           "checkpoint, or a bare backbone state dict")
    parser.add_argument("--out", default=None,
                        help="output file (default: teacher_backbone.safetensors beside the "
                             "checkpoint; student_backbone.safetensors with --which student)")
    parser.add_argument("--which", default=None, choices=("teacher", "student"),
                        help="network to export (default: the teacher, the one DeSD evaluates; "
                             "the student if there is no teacher; a bare state dict as it is)")
    args = parser.parse_args(argv)
    try:
        summary = export_backbone(args.checkpoint, args.out, args.which)
    except PretrainedLoadError as e:
        raise SystemExit(f"export_backbone.py: error: {e}") from None
    print(f"{summary['n_tensors']} tensors ({summary['arch'] or 'unknown depth'}) of the "
          f"{summary['source']} written to {summary['out']}; {summary['n_dropped']} head "
          f"tensors left out")
    return summary


if __name__ == "__main__":
    main()
