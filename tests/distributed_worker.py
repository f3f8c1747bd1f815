"""Run under torchrun by tests/test_distributed.py: the jobs of a JSON file, in order, in the
same two processes (one process-group start for all of them).

A job is {"train": [overrides], "resume": ""} or {"eval": MODEL_DIR, "overrides": [...],
"out": JSON} (the FSDP engine around a saved model, distributed evaluation)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from coordexp.config import load_config
from coordexp.data.records import read_records
from coordexp.model.qwen_vl import load_vlm
from coordexp.train.engine import StepModule, wrap
from coordexp.train.loop import evaluate_distributed, train


def run_eval(job: dict) -> None:
    accelerator = Accelerator(cpu=True)
    cfg = load_config(None, job["overrides"])
    model, processor, _ = load_vlm(job["eval"])
    engine = wrap(StepModule(model, None), "fsdp", accelerator.num_processes, torch.device("cpu"))
    records = read_records(cfg.data.val)
    metrics, samples = evaluate_distributed(engine, processor, records, cfg,
                                            accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        Path(job["out"]).write_text(json.dumps({"metrics": metrics, "samples": samples}))


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        if "eval" in job:
            run_eval(job)
        else:
            train(load_config(None, job["train"]), resume=job.get("resume", ""))


if __name__ == "__main__":
    main(sys.argv[1])
