"""Evaluation: score generated portraits the way PortraitBooth and FastComposer do, and run
FastComposer's protocol (subjects x 40 prompts x images per prompt, every pair x 21 prompts)
through ComfyUI for any weight file the pack runs, on one or several servers, into a table
beside the PortraitBooth paper's.

    python -m evaluation score --references refs/ --images generated/ --out report/
    python -m evaluation protocol --start --subjects refs/ --checkpoint sd15.safetensors \
        --weights portraitbooth.safetensors --weights fastcomposer_postfuse.safetensors --out report/

    methods.py   weight file kind -> method and template; graphs filled by node roles
    protocol.py  the jobs (subjects, prompts, seeds) of every method and setting
    fanout.py    one queue over several servers, resumable from the manifest
    score.py     identity (pack recognizer or facenet.py, the paper's metric), CLIP-T
    report.py, protocol_report.py   per-run reports; the Table-3 summary and contact sheets

A package of its own, beside `training/`: it needs neither the training loop nor its
dependencies, and users with a finished model run it without anything else.
"""
