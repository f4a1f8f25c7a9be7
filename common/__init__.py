"""What the pipeline's scripts share, one concern per file. Imports run one way:

    atomic.py, cli.py          (standard library only)
    lock.py                    (standard library and atomic)
    volume_io.py               (top level: the formats; imports atomic)
    listfile.py, stages.py     (import atomic, cli, volume_io; stages also lock)
    resample.py                (numpy/scipy and models.contract)
    cases.py                   (imports cli, resample, volume_io; synthetic_ct when generating)
    retrieval.py, speed.py     (torch: view retrieval; the trainer's optional fast paths)
    desd_args.py               (the trainer's flags; imports cli, models, utils)
    probe_report.py            (the probes' statistics and tables; imports atomic)
    checkpoints.py             (torch: the trainer's checkpoint; imports atomic, models, utils)

Nothing here imports a stage script, the trainer, a tool or the example.
"""
