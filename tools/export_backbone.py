"""Export the backbone of a DeSD checkpoint as a bare `.safetensors` state dict.

    python tools/export_backbone.py checkpoint.pth    # -> teacher_backbone.safetensors beside it
    python tools/export_backbone.py DeSD_Res50.pth --out desd_res50_teacher.safetensors
    python tools/export_backbone.py checkpoint.pth --which student

Works on main_desd.py's `checkpoint.pth`, on the released DeSD checkpoint (read with
`weights_only=True`; only its `argparse.Namespace` is allowed) and on bare state dicts.
The file is what the trainer writes at the end of a run (`models.save_backbone`): the keys
of `models.ResNet3D` (`conv1.weight`, `layer1.0.conv1.weight`, ...), the depth checked
against every tensor's shape and written as metadata (`arch`, `source`, `checkpoint`), no
NaN/inf. `models.load_pretrained_encoder` and `encoder.load_state_dict` take it directly;
a `.safetensors` file holds only tensors and cannot run code when read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import utils  # noqa: E402
from common import atomic  # noqa: E402
from models import backbone_only, extract_backbone_state, read_checkpoint, save_backbone  # noqa: E402


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                    which: str | None = None) -> dict:
    """Write the backbone of `checkpoint` to `out` (atomically); return a summary.

    `which`: 'teacher' or 'student'; by default the teacher, else the student, else the
    checkpoint itself as a bare state dict. `out` defaults to `teacher_backbone.safetensors`
    (`student_…`, or `<checkpoint name>_backbone…` for a bare state dict) beside the
    checkpoint. The depth is the tensors'; a checkpoint whose args name another depth is
    refused. Raises `models.PretrainedLoadError` (a ValueError) when the checkpoint holds no
    complete, finite res3d* backbone, ValueError when its args contradict its tensors.
    """
    checkpoint = Path(checkpoint)
    read = read_checkpoint(checkpoint)
    utils.checkpoint_arch(checkpoint, which, read)  # refuses args that contradict the tensors
    state, source = extract_backbone_state(read, which)
    if out is None:
        stem = source if source in ("teacher", "student") else checkpoint.name.split(".")[0]
        out = checkpoint.with_name(f"{stem}_backbone.safetensors")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_write(out) as f:
        meta = save_backbone(state, f, {"source": source, "checkpoint": checkpoint.name})
    n = len(backbone_only(state))
    return {"out": str(out), "arch": meta["arch"], "source": source, "n_tensors": n,
            "n_dropped": len(state) - n}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("export_backbone.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    except (ValueError, OSError) as e:
        print(f"export_backbone.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{summary['n_tensors']} tensors ({summary['arch']}) of the {summary['source']} "
          f"written to {summary['out']}; {summary['n_dropped']} head tensors left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
